//! The ingest role's supervisor: a [`Supervisor`] with one consumer per
//! topic as its children (bars on `h_alpaca` and `live_bars`, macro on
//! `h_macrodata`, company on `h_company`), restarted by the
//! `[supervision]` policy of cluster.toml (strategy, budget, jittered
//! backoff on a timer). When the budget is spent it fails, and its parent
//! decides.
//!
//! [`Supervisor`]: tickmesh_io::supervision::Supervisor

use tickmesh_core::config::SupervisionConfig;
use tickmesh_core::types::topics;
use tickmesh_core::{Error, Result};
use tickmesh_io::supervision::{ChildSpec, SupervisorArgs};

use crate::bars_consumer::BarsConsumerActor;
use crate::company_consumer::CompanyConsumerActor;
use crate::consumer::ConsumerArgs;
use crate::macro_consumer::MacroConsumerActor;

/// The topics the ingest role consumes, in start order.
pub const INGEST_TOPICS: [&str; 4] = [
    topics::BARS,
    topics::LIVE_BARS,
    topics::MACRO,
    topics::COMPANY,
];

/// The consumer of one topic: the source is chosen by the topic.
pub fn consumer_child(args: ConsumerArgs) -> Result<ChildSpec> {
    let name = args.topic.clone();
    Ok(match args.topic.as_str() {
        topics::BARS | topics::LIVE_BARS => {
            ChildSpec::actor(name, BarsConsumerActor::default(), move || args.clone())
        }
        topics::MACRO => {
            ChildSpec::actor(name, MacroConsumerActor::default(), move || args.clone())
        }
        topics::COMPANY => {
            ChildSpec::actor(name, CompanyConsumerActor::default(), move || args.clone())
        }
        other => {
            return Err(Error::invalid(
                "ingest topic",
                format!(
                    "`{other}` has no consumer; the ingest topics are {}",
                    INGEST_TOPICS.join(", ")
                ),
            ))
        }
    })
}

/// The arguments of the ingest role's [`Supervisor`](tickmesh_io::supervision::Supervisor):
/// one consumer per element of `consumers`.
pub fn ingest_supervisor(
    consumers: Vec<ConsumerArgs>,
    policy: SupervisionConfig,
) -> Result<SupervisorArgs> {
    let children = consumers
        .into_iter()
        .map(consumer_child)
        .collect::<Result<_>>()?;
    Ok(SupervisorArgs {
        name: "ingest".into(),
        policy,
        children,
    })
}
