//! The ingest role's supervisor: a [`Supervisor`] with one consumer per
//! configured topic as its children, restarted by the `[supervision]`
//! policy of cluster.toml (strategy, budget, jittered backoff on a timer).
//! When the budget is spent it fails, and its parent decides.
//!
//! [`Supervisor`]: tickmesh_core::supervision::Supervisor

use tickmesh_core::config::SupervisionConfig;
use tickmesh_core::supervision::{ChildSpec, SupervisorArgs};

use crate::bars_consumer::BarsConsumerActor;
use crate::consumer::ConsumerArgs;

/// The arguments of the ingest role's [`Supervisor`](tickmesh_core::supervision::Supervisor).
pub fn ingest_supervisor(bars: Vec<ConsumerArgs>, policy: SupervisionConfig) -> SupervisorArgs {
    let children = bars
        .into_iter()
        .map(|a| {
            let name = format!("bars:{}", a.topic);
            ChildSpec::actor(name, BarsConsumerActor::default(), move || a.clone())
        })
        .collect();
    SupervisorArgs {
        name: "ingest".into(),
        policy,
        children,
    }
}
