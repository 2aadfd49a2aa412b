//! `IngestSupervisor`: spawns one [`BarsConsumerActor`] per configured topic
//! and restarts a failed one after a jittered backoff while its restart
//! budget lasts (`[supervision]` in cluster.toml). When the budget is spent
//! the supervisor stops with an error, and its parent decides.

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use tickmesh_core::supervision::{stopped_child, RestartBudget};
use tracing::{error, warn};

use crate::bars_consumer::{BarsConsumerActor, BarsConsumerArgs};

pub struct IngestSupervisor;

/// Messages of [`IngestSupervisor`]; it only reacts to supervision events.
#[derive(Debug)]
pub enum IngestSupervisorMsg {}

impl ractor::Message for IngestSupervisorMsg {}

pub struct IngestSupervisorArgs {
    pub consumers: Vec<BarsConsumerArgs>,
    pub budget: RestartBudget,
}

pub struct IngestSupervisorState {
    children: Vec<(ActorCell, BarsConsumerArgs)>,
    budget: RestartBudget,
}

async fn spawn_child(
    myself: &ActorRef<IngestSupervisorMsg>,
    args: BarsConsumerArgs,
) -> Result<ActorCell, ActorProcessingErr> {
    let (child, _) = Actor::spawn_linked(None, BarsConsumerActor, args, myself.get_cell()).await?;
    Ok(child.get_cell())
}

impl Actor for IngestSupervisor {
    type Msg = IngestSupervisorMsg;
    type State = IngestSupervisorState;
    type Arguments = IngestSupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut children = Vec::new();
        for a in args.consumers {
            children.push((spawn_child(&myself, a.clone()).await?, a));
        }
        Ok(IngestSupervisorState {
            children,
            budget: args.budget,
        })
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let Some((child, why)) = stopped_child(&evt) else {
            return Ok(());
        };
        let Some(i) = state.children.iter().position(|(c, _)| c.get_id() == child) else {
            return Ok(());
        };
        let Some(backoff) = state.budget.allow() else {
            error!(reason = %why, "ingest restart budget spent, giving up");
            myself.stop(Some(format!("ingest consumer failed too often: {why}")));
            return Ok(());
        };
        warn!(reason = %why, backoff_ms = backoff.as_millis() as u64, "bars consumer failed, restarting");
        tokio::time::sleep(backoff).await;
        let args = state.children[i].1.clone();
        state.children[i].0 = spawn_child(&myself, args).await?;
        Ok(())
    }
}
