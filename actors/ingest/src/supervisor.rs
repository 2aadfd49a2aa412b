//! The ingest role's supervisor: a [`Supervisor`] with one
//! [`BarsConsumerActor`] per configured topic as its children, restarted by
//! the `[supervision]` policy of cluster.toml (strategy, budget, jittered
//! backoff on a timer). When the budget is spent it fails, and its parent
//! decides.

use tickmesh_core::config::SupervisionConfig;
use tickmesh_core::supervision::{ChildSpec, SupervisorArgs};

use crate::bars_consumer::{BarsConsumerActor, BarsConsumerArgs};

/// The arguments of the ingest role's [`Supervisor`](tickmesh_core::supervision::Supervisor).
pub fn ingest_supervisor(
    consumers: Vec<BarsConsumerArgs>,
    policy: SupervisionConfig,
) -> SupervisorArgs {
    let children = consumers
        .into_iter()
        .map(|a| {
            let name = format!("bars:{}", a.topic);
            ChildSpec::actor(name, BarsConsumerActor, move || a.clone())
        })
        .collect();
    SupervisorArgs {
        name: "ingest".into(),
        policy,
        children,
    }
}
