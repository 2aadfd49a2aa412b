//! `TrainerPort`: a trainer pool's face on the ractor_cluster mesh.
//! Registered as `tickmesh.SCOPE.trainer.NODE` in the cluster's group
//! `trainers`; it
//! receives assignments from the coordinator ([`TrainerPortMsg`]) and hands
//! each one, validated, to its pool. An assignment that does not decode is
//! refused with the reason (the coordinator takes the job back when its
//! lease runs out). It is its pool's child and lives as long as the pool's
//! incarnation: when the node's mesh session ends the coordinator sees it
//! leave its group, and the node is lost.

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef};
use tickmesh_core::types::Interval;
use tickmesh_proto::mesh::{Assignment, Scope, TrainerPortMsg, TRAINERS};
use tracing::warn;

use crate::pool::PoolMsg;
use crate::trainer::Job;

pub struct TrainerPort;

impl TrainerPort {
    /// Spawns `node`'s port linked to `pool`, taking its name over from a
    /// stopped incarnation of the pool in this process.
    pub async fn spawn(
        scope: &Scope,
        node: &str,
        pool: ActorRef<PoolMsg>,
    ) -> Result<ActorCell, ActorProcessingErr> {
        let owner = pool.get_cell();
        scope
            .spawn_port(TRAINERS, scope.trainer_port(node), TrainerPort, pool, owner)
            .await
    }
}

impl Actor for TrainerPort {
    type Msg = TrainerPortMsg;
    type State = ActorRef<PoolMsg>;
    type Arguments = ActorRef<PoolMsg>;

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        pool: ActorRef<PoolMsg>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(pool)
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: Self::Msg,
        pool: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TrainerPortMsg::Assign(a) => match a.into_result().and_then(job_of) {
                Ok(job) => pool.cast(PoolMsg::Assigned(job))?,
                Err(e) => warn!(reason = %e, "assignment refused"),
            },
        }
        Ok(())
    }
}

/// A job from an assignment.
pub fn job_of(a: Assignment) -> Result<Job, String> {
    let interval = a
        .interval
        .parse::<Interval>()
        .map_err(|e| format!("assignment {}: {e}", a.job_id))?;
    let model = match a.model.as_str() {
        "" => None,
        m => Some(
            m.parse()
                .map_err(|e: tickmesh_core::Error| format!("assignment {}: {e}", a.job_id))?,
        ),
    };
    tickmesh_core::types::validate_ticker(&a.ticker)
        .map_err(|e| format!("assignment {}: {e}", a.job_id))?;
    Ok(Job {
        id: a.job_id,
        ticker: a.ticker,
        interval,
        epoch: a.epoch,
        version: a.version,
        model,
        epochs: (a.epochs > 0).then_some(a.epochs as usize),
        resume_key: (!a.resume_key.is_empty()).then_some(a.resume_key),
        attempt: a.attempt,
    })
}
