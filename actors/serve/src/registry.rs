//! `PredictorSupervisor`: receives model versions (from its mesh port, a
//! child: see [`crate::port`]) and forecast requests (from HTTP). Spawns one linked
//! `PredictorActor` per (ticker, interval) on its first version, forwards
//! loads and requests to it, keeps what each one serves for `/ml/models`,
//! and respawns a predictor that crashed (reloading its version). If its
//! port stops, the registry fails with it (and its supervisor restarts both).

use std::collections::{BTreeMap, HashMap};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tickmesh_core::types::Interval;
use tickmesh_io::db::Db;
use tickmesh_io::store::SharedStore;
use tracing::{error, warn};

use crate::port::PredictorPort;
use crate::predictor::{
    ForecastResponse, ModelInfo, PredictorActor, PredictorArgs, PredictorMsg, VersionRef,
};
use crate::ServeError;

#[derive(Clone, Copy)]
pub struct PredictorSupervisor;

/// Messages of [`PredictorSupervisor`].
pub enum RegistryMsg {
    /// A version is available for a (ticker, interval).
    ModelAvailable {
        ticker: String,
        interval: Interval,
        version: VersionRef,
    },
    /// A predictor now serves this version.
    Serving(Box<ModelInfo>),
    /// Route a forecast request.
    Forecast {
        ticker: String,
        interval: Interval,
        n_steps: usize,
        reply: RpcReplyPort<Result<ForecastResponse, ServeError>>,
    },
    /// What is served.
    List(RpcReplyPort<Vec<ModelInfo>>),
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
    pub device: tch::Device,
}

type Key = (String, Interval);

pub struct RegistryState {
    args: RegistryArgs,
    port: Option<ActorCell>,
    predictors: HashMap<Key, (ActorRef<PredictorMsg>, VersionRef)>,
    serving: BTreeMap<Key, ModelInfo>,
}

async fn spawn_predictor(
    myself: &ActorRef<RegistryMsg>,
    args: &RegistryArgs,
    key: &Key,
) -> Result<ActorRef<PredictorMsg>, ActorProcessingErr> {
    let pa = PredictorArgs {
        ticker: key.0.clone(),
        interval: key.1,
        store: args.store.clone(),
        db: args.db.clone(),
        device: args.device,
        registry: myself.clone(),
    };
    let (p, _) = Actor::spawn_linked(None, PredictorActor, pa, myself.get_cell()).await?;
    Ok(p)
}

/// Tells the predictor of `key` (spawned on first use) to load `version`.
async fn load(
    myself: &ActorRef<RegistryMsg>,
    st: &mut RegistryState,
    key: Key,
    version: VersionRef,
) -> Result<(), ActorProcessingErr> {
    let p = match st.predictors.get(&key) {
        Some((p, _)) => p.clone(),
        None => spawn_predictor(myself, &st.args, &key).await?,
    };
    p.cast(PredictorMsg::Load(version.clone()))?;
    st.predictors.insert(key, (p, version));
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
            serving: BTreeMap::new(),
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
            RegistryMsg::Serving(info) => {
                st.serving
                    .insert((info.ticker.clone(), info.interval), *info);
            }
            RegistryMsg::Forecast {
                ticker,
                interval,
                n_steps,
                reply,
            } => match st.predictors.get(&(ticker.clone(), interval)) {
                Some((p, _)) => p.cast(PredictorMsg::Forecast { n_steps, reply })?,
                None => {
                    let _ = reply.send(Err(ServeError::NotFound(format!(
                            "unknown ticker {ticker} for interval {interval}: no model has been trained for it"
                        ))));
                }
            },
            RegistryMsg::List(reply) => {
                let _ = reply.send(st.serving.values().cloned().collect());
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
        if let Some((id, why)) = tickmesh_io::supervision::stopped_child(&evt) {
            if st.port.as_ref().map(|p| p.get_id()) == Some(id) {
                return Err(format!("the registry's mesh port stopped: {why}").into());
            }
        }
        if let SupervisionEvent::ActorFailed(cell, err) = evt {
            let key = st
                .predictors
                .iter()
                .find(|(_, (p, _))| p.get_id() == cell.get_id())
                .map(|(k, _)| k.clone());
            if let Some(key) = key {
                error!(ticker = %key.0, interval = %key.1, error = %err, "predictor crashed; respawning");
                let version = st.predictors[&key].1.clone();
                let p = spawn_predictor(&myself, &st.args, &key).await?;
                p.cast(PredictorMsg::Load(version.clone()))?;
                st.predictors.insert(key.clone(), (p, version));
                st.serving.remove(&key);
            }
        }
        Ok(())
    }
}
