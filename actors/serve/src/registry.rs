//! `PredictorSupervisor`: receives model versions (from its mesh port, a
//! child: see [`crate::port`]) and supervises one linked `PredictorActor`
//! per (ticker, interval), spawned on its first version. Requests never pass
//! through it: they read the node's [`Table`] of model handles, which
//! outlives the registry and its predictors, so a model keeps serving while
//! its predictor restarts.
//!
//! A predictor that crashes is restarted after the cluster's supervision
//! backoff and told its version again; each predictor has its own restart
//! budget (`[supervision]`: at most `max_restarts` in `window_secs`). A
//! predictor past its budget makes the registry fail with the reason, and
//! the registry's supervisor decides (escalation, as OTP does). If its port
//! stops, the registry fails with it too.

use std::collections::HashMap;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use tickmesh_core::config::{RetrainConfig, ServeConfig, SupervisionConfig};
use tickmesh_core::types::Interval;
use tickmesh_io::db::Db;
use tickmesh_io::store::SharedStore;
use tickmesh_io::supervision::RestartBudget;
use tracing::{error, warn};

use crate::handle::Table;
use crate::port::PredictorPort;
use crate::predictor::{PredictorActor, PredictorArgs, PredictorMsg, VersionRef};

#[derive(Clone, Copy)]
pub struct PredictorSupervisor;

/// The supervisor name in restart metrics.
pub const SUPERVISOR: &str = "serve";

/// Messages of [`PredictorSupervisor`].
pub enum RegistryMsg {
    /// A version is the champion of a (ticker, interval).
    ModelAvailable {
        ticker: String,
        interval: Interval,
        version: VersionRef,
    },
    /// Start the predictor of a (ticker, interval) again (after its backoff).
    Respawn(Key),
}

impl ractor::Message for RegistryMsg {}

#[derive(Clone)]
pub struct RegistryArgs {
    /// The node's name and its cluster's scope: its port is
    /// `tickmesh.SCOPE.predictor.NODE`.
    pub node: String,
    pub scope: tickmesh_proto::mesh::Scope,
    pub store: SharedStore,
    pub db: Db,
    pub table: Table,
    pub serve: ServeConfig,
    pub retrain: RetrainConfig,
    pub supervision: SupervisionConfig,
}

pub type Key = (String, Interval);

struct Child {
    /// `None` while a restart waits out its backoff.
    actor: Option<ActorRef<PredictorMsg>>,
    version: VersionRef,
    budget: RestartBudget,
}

pub struct RegistryState {
    args: RegistryArgs,
    port: Option<ActorCell>,
    predictors: HashMap<Key, Child>,
}

async fn spawn_predictor(
    myself: &ActorRef<RegistryMsg>,
    args: &RegistryArgs,
    key: &Key,
    version: &VersionRef,
) -> Result<ActorRef<PredictorMsg>, ActorProcessingErr> {
    let pa = PredictorArgs {
        handle: args.table.get_or_create(&key.0, key.1),
        store: args.store.clone(),
        db: args.db.clone(),
        cfg: args.serve.clone(),
        retrain: args.retrain.clone(),
        node: args.node.clone(),
    };
    let (p, _) = Actor::spawn_linked(None, PredictorActor, pa, myself.get_cell()).await?;
    p.cast(PredictorMsg::Load(version.clone()))?;
    Ok(p)
}

/// Tells the predictor of `key` (spawned on first use) to serve `version`.
async fn load(
    myself: &ActorRef<RegistryMsg>,
    st: &mut RegistryState,
    key: Key,
    version: VersionRef,
) -> Result<(), ActorProcessingErr> {
    match st.predictors.get_mut(&key) {
        Some(child) => {
            child.version = version.clone();
            if let Some(p) = &child.actor {
                p.cast(PredictorMsg::Load(version))?;
            }
        }
        None => {
            let p = spawn_predictor(myself, &st.args, &key, &version).await?;
            st.predictors.insert(
                key,
                Child {
                    actor: Some(p),
                    version,
                    budget: RestartBudget::new(st.args.supervision.clone()),
                },
            );
        }
    }
    Ok(())
}

impl Actor for PredictorSupervisor {
    type Msg = RegistryMsg;
    type State = RegistryState;
    type Arguments = RegistryArgs;

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        args: RegistryArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(RegistryState {
            args,
            port: None,
            predictors: HashMap::new(),
        })
    }

    /// A (re)started registry serves the champions at once, from the
    /// registry table, without waiting for the coordinator; then its port
    /// joins the mesh.
    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Applied here, before any queued message: an update the port
        // delivers is newer, and comes after.
        match st.args.db.champions().await {
            Ok(champions) => {
                for m in champions {
                    let key = (m.ticker, m.interval);
                    if st.predictors.contains_key(&key) {
                        continue;
                    }
                    let version = VersionRef {
                        version: m.version,
                        sha256: m.sha256,
                    };
                    load(&myself, st, key, version).await?;
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot read the champions; waiting for the coordinator's")
            }
        }
        st.port = Some(PredictorPort::spawn(&st.args.scope, &st.args.node, myself.clone()).await?);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RegistryMsg::ModelAvailable {
                ticker,
                interval,
                version,
            } => {
                load(&myself, st, (ticker, interval), version).await?;
            }
            RegistryMsg::Respawn(key) => {
                let Some(child) = st.predictors.get(&key) else {
                    return Ok(());
                };
                if child.actor.is_some() {
                    return Ok(());
                }
                let p = spawn_predictor(&myself, &st.args, &key, &child.version).await?;
                if let Some(child) = st.predictors.get_mut(&key) {
                    child.actor = Some(p);
                }
                tickmesh_io::supervision::metrics()
                    .restarted(SUPERVISOR, &format!("predictor {} {}", key.0, key.1));
                st.args
                    .table
                    .get_or_create(&key.0, key.1)
                    .update_status(|s| s.restarts += 1);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let Some((id, why)) = tickmesh_io::supervision::stopped_child(&evt) else {
            return Ok(());
        };
        if st.port.as_ref().map(|p| p.get_id()) == Some(id) {
            return Err(format!("the registry's mesh port stopped: {why}").into());
        }
        let key = st
            .predictors
            .iter()
            .find(|(_, c)| c.actor.as_ref().is_some_and(|p| p.get_id() == id))
            .map(|(k, _)| k.clone());
        let Some(key) = key else {
            return Ok(());
        };
        let child = st.predictors.get_mut(&key).expect("found above");
        child.actor = None;
        match child.budget.allow() {
            Some(backoff) => {
                error!(ticker = %key.0, interval = %key.1, reason = %why, backoff_ms = backoff.as_millis() as u64,
                    "predictor stopped; restarting it");
                myself.send_after(backoff, move || RegistryMsg::Respawn(key));
            }
            None => {
                let reason = format!(
                    "the predictor of {} {} stopped more than {} times in {} s, the last: {why}",
                    key.0, key.1, st.args.supervision.max_restarts, st.args.supervision.window_secs
                );
                tickmesh_io::supervision::metrics().escalated(SUPERVISOR, &reason);
                return Err(reason.into());
            }
        }
        Ok(())
    }
}
