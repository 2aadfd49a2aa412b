//! `PredictorPort`: a predictor registry's face on the ractor_cluster mesh.
//! Registered as `tickmesh.SCOPE.predictor.NODE` in the cluster's group
//! `predictors`; it
//! receives model versions from the coordinator ([`PredictorPortMsg`]): each
//! new or changed champion, and every champion when the port joins (a node
//! that starts, or reconnects after its session broke). Each valid one goes
//! to the registry as `ModelAvailable`; one that does not decode is refused
//! with the reason. It is the registry's child and lives as long as the
//! registry's incarnation.

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef};
use tickmesh_core::types::Interval;
use tickmesh_proto::mesh::{ModelUpdate, PredictorPortMsg, Scope, PREDICTORS};
use tracing::warn;

use crate::predictor::VersionRef;
use crate::registry::RegistryMsg;

pub struct PredictorPort;

impl PredictorPort {
    /// Spawns `node`'s port linked to `registry`, taking its name over from
    /// a stopped incarnation of the registry in this process.
    pub async fn spawn(
        scope: &Scope,
        node: &str,
        registry: ActorRef<RegistryMsg>,
    ) -> Result<ActorCell, ActorProcessingErr> {
        let owner = registry.get_cell();
        scope
            .spawn_port(
                PREDICTORS,
                scope.predictor_port(node),
                PredictorPort,
                registry,
                owner,
            )
            .await
    }
}

impl Actor for PredictorPort {
    type Msg = PredictorPortMsg;
    type State = ActorRef<RegistryMsg>;
    type Arguments = ActorRef<RegistryMsg>;

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        registry: ActorRef<RegistryMsg>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(registry)
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: Self::Msg,
        registry: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PredictorPortMsg::Model(u) => match u.into_result().and_then(available) {
                Ok(m) => registry.cast(m)?,
                Err(e) => warn!(reason = %e, "model update refused"),
            },
        }
        Ok(())
    }
}

fn available(u: ModelUpdate) -> Result<RegistryMsg, String> {
    let interval = u
        .interval
        .parse::<Interval>()
        .map_err(|e| format!("model update {} v{}: {e}", u.ticker, u.version))?;
    tickmesh_core::types::validate_ticker(&u.ticker)
        .map_err(|e| format!("model update v{}: {e}", u.version))?;
    Ok(RegistryMsg::ModelAvailable {
        ticker: u.ticker,
        interval,
        version: VersionRef {
            version: u.version,
            sha256: u.sha256,
        },
    })
}
