//! The node protocol: what tickmesh nodes say to each other as actors on the
//! ractor_cluster mesh (see `docs/mesh-protocol.md`).
//!
//! Three kinds of port actor carry it, each a registered name in a process
//! group of the cluster's [`Scope`] (the pg scope named after
//! `cluster.name`), so that ractor_cluster announces it to every connected
//! node and two clusters never mix:
//!
//! | port | name | group | receives |
//! |---|---|---|---|
//! | the coordinator's | `tickmesh.SCOPE.coordinator` | [`COORDINATORS`] | [`CoordinatorPortMsg`]: register, heartbeat, progress, checkpoint, failure, job status |
//! | a trainer pool's | `tickmesh.SCOPE.trainer.NODE` | [`TRAINERS`] | [`TrainerPortMsg`]: assignments |
//! | a predictor registry's | `tickmesh.SCOPE.predictor.NODE` | [`PREDICTORS`] | [`PredictorPortMsg`]: model versions |
//!
//! Payloads are [`Wire`] values: serde structs encoded with bincode 2
//! (standard configuration), at most [`MAX_MESSAGE_BYTES`] each. A payload
//! that does not decode arrives as [`Wire::Bad`] with the reason, and the
//! receiver refuses it with that reason instead of failing. In one process
//! (the embedded demo) the same ports talk without encoding anything.
//!
//! The mesh's cookie authenticates nodes; a node name is held by one
//! process at a time: its port's registered name, and at the coordinator
//! its incarnation (a random number per process start).

use std::fmt;

use ractor::RpcReplyPort;
use ractor_cluster::{BytesConvertable, RactorClusterMessage};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use crate::v1::JobStatus;

/// The largest payload a port decodes.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// The group the coordinator's port joins (so the mesh announces it).
pub const COORDINATORS: &str = "coordinators";
/// The group of trainer pools' ports.
pub const TRAINERS: &str = "trainers";
/// The group of predictor registries' ports.
pub const PREDICTORS: &str = "predictors";

/// One cluster's namespace on the mesh: the pg scope its groups live in and
/// the prefix of its ports' names. Named after `cluster.name` on a mesh; a
/// process without a mesh (the embedded demo, tests) takes a scope of its
/// own, so that nodes started side by side in one process stay apart.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope(String);

impl Scope {
    /// The scope of the cluster named `cluster`.
    pub fn new(cluster: &str) -> Self {
        Scope(cluster.to_string())
    }

    /// A scope no other call in this process gets.
    pub fn local() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Scope(format!("local-{}-{n}", std::process::id()))
    }

    pub fn name(&self) -> &str {
        &self.0
    }

    /// The registered name of the coordinator's port.
    pub fn coordinator_port(&self) -> String {
        format!("tickmesh.{}.coordinator", self.0)
    }

    /// The registered name of `node`'s trainer port.
    pub fn trainer_port(&self, node: &str) -> String {
        format!("tickmesh.{}.trainer.{node}", self.0)
    }

    /// The registered name of `node`'s predictor port.
    pub fn predictor_port(&self, node: &str) -> String {
        format!("tickmesh.{}.predictor.{node}", self.0)
    }

    /// Puts `cell` in `group` of this scope.
    pub fn join(&self, group: &str, cell: ractor::ActorCell) {
        ractor::pg::join_scoped(self.0.clone(), group.to_string(), vec![cell]);
    }

    /// The members of `group` in this scope (local, and announced by peers).
    pub fn members(&self, group: &str) -> Vec<ractor::ActorCell> {
        ractor::pg::get_scoped_members(&self.0, &group.to_string())
    }

    /// The members of `group` named `name`. Names are how ports are found:
    /// ractor_cluster announces a remote actor's name with its group
    /// membership (remote actors are not in the local name registry).
    pub fn named(&self, group: &str, name: &str) -> Vec<ractor::ActorCell> {
        self.members(group)
            .into_iter()
            .filter(|c| c.get_name().as_deref() == Some(name))
            .collect()
    }

    /// The one member of `group` named `name`; `Err` when several claim it.
    pub fn one_named(&self, group: &str, name: &str) -> Result<Option<ractor::ActorCell>, String> {
        let mut cells = self.named(group, name);
        match cells.len() {
            0 | 1 => Ok(cells.pop()),
            n => Err(format!(
                "{n} actors on the mesh claim `{name}` (group {group} of cluster `{}`); none is used",
                self.0
            )),
        }
    }

    /// Fails when a process other than this one runs a port named `name` in
    /// `group`; stops this process's own stale one (a stopped owner's).
    pub async fn claim(&self, group: &str, name: &str) -> Result<(), String> {
        if let Some(remote) = self
            .named(group, name)
            .into_iter()
            .find(|c| !c.get_id().is_local())
        {
            return Err(format!(
                "another process on the mesh runs `{name}` (actor {}) in cluster `{}`",
                remote.get_id(),
                self.0
            ));
        }
        if let Some(old) = ractor::registry::where_is(name) {
            old.stop_and_wait(
                Some("replaced by a new incarnation".into()),
                Some(std::time::Duration::from_secs(5)),
            )
            .await
            .map_err(|e| format!("the previous `{name}` does not stop: {e}"))?;
        }
        Ok(())
    }

    /// Spawns a port: `actor` registered as `name`, linked to `owner`, in
    /// `group` of this scope (after [`Scope::claim`]).
    pub async fn spawn_port<A: ractor::Actor>(
        &self,
        group: &str,
        name: String,
        actor: A,
        args: A::Arguments,
        owner: ractor::ActorCell,
    ) -> Result<ractor::ActorCell, ractor::ActorProcessingErr> {
        self.claim(group, &name).await?;
        let (port, _) = ractor::Actor::spawn_linked(Some(name), actor, args, owner).await?;
        self.join(group, port.get_cell());
        Ok(port.get_cell())
    }

    /// Sends `cell` a `ProcessGroupChanged` supervision event for every
    /// join and leave in this scope.
    pub fn monitor(&self, cell: ractor::ActorCell) {
        ractor::pg::monitor_scope(self.0.clone(), cell);
    }

    /// The coordinator's port, or why there is none.
    pub fn coordinator(&self) -> Result<ractor::ActorRef<CoordinatorPortMsg>, Unreachable> {
        match self.one_named(COORDINATORS, &self.coordinator_port()) {
            Ok(Some(cell)) => Ok(cell.into()),
            Ok(None) => Err(Unreachable(format!(
                "no coordinator of cluster `{}` on the mesh (not connected to its node yet, or it is restarting)",
                self.0
            ))),
            Err(e) => Err(Unreachable(e)),
        }
    }

    /// Calls the coordinator's port and waits up to `timeout` for the
    /// answer; `what` names the call in the error.
    pub async fn ask<T>(
        &self,
        what: &str,
        build: impl FnOnce(RpcReplyPort<Wire<T>>) -> CoordinatorPortMsg,
        timeout: std::time::Duration,
    ) -> Result<T, String>
    where
        T: Send + 'static,
    {
        let port = self.coordinator().map_err(|e| format!("{what}: {e}"))?;
        match port.call(build, Some(timeout)).await {
            Ok(ractor::rpc::CallResult::Success(w)) => {
                w.into_result().map_err(|e| format!("{what}: {e}"))
            }
            Ok(ractor::rpc::CallResult::Timeout) => Err(format!(
                "{what}: the coordinator did not answer within {:.1} s",
                timeout.as_secs_f64()
            )),
            Ok(ractor::rpc::CallResult::SenderError) => {
                Err(format!("{what}: the coordinator dropped the call"))
            }
            Err(e) => Err(format!("{what}: {e}")),
        }
    }
}

/// A payload on the mesh: the value, or why what arrived is not one.
#[derive(Debug, Clone, PartialEq)]
pub enum Wire<T> {
    Ok(T),
    /// It did not decode (or was too large); the reason.
    Bad(String),
}

impl<T> Wire<T> {
    /// The value, or the reason it did not arrive.
    pub fn into_result(self) -> Result<T, String> {
        match self {
            Wire::Ok(v) => Ok(v),
            Wire::Bad(e) => Err(e),
        }
    }
}

impl<T> From<T> for Wire<T> {
    fn from(v: T) -> Self {
        Wire::Ok(v)
    }
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes `value` as a mesh payload.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    let bytes = bincode::serde::encode_to_vec(value, config()).map_err(|e| e.to_string())?;
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(format!(
            "{} of {} bytes; a mesh message is at most {MAX_MESSAGE_BYTES}",
            short_type::<T>(),
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// Decodes a mesh payload: the whole of `bytes`, at most
/// [`MAX_MESSAGE_BYTES`], with no allocation beyond that limit.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let what = short_type::<T>();
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(format!(
            "{what} of {} bytes refused; a mesh message is at most {MAX_MESSAGE_BYTES}",
            bytes.len()
        ));
    }
    let cfg = config().with_limit::<MAX_MESSAGE_BYTES>();
    match bincode::serde::decode_from_slice::<T, _>(bytes, cfg) {
        Ok((v, n)) if n == bytes.len() => Ok(v),
        Ok((_, n)) => Err(format!(
            "{what}: {} trailing bytes after the message",
            bytes.len() - n
        )),
        Err(e) => Err(format!("{what} does not decode: {e}")),
    }
}

/// `T`'s name without module paths (`Result<Assignment, String>`).
fn short_type<T>() -> String {
    let mut out = String::new();
    let mut seg = String::new();
    for c in std::any::type_name::<T>().chars() {
        if c.is_alphanumeric() || c == '_' || c == ':' {
            seg.push(c);
        } else {
            out.push_str(seg.rsplit("::").next().unwrap_or(""));
            seg.clear();
            out.push(c);
        }
    }
    out.push_str(seg.rsplit("::").next().unwrap_or(""));
    out
}

impl<T: Serialize + DeserializeOwned> BytesConvertable for Wire<T> {
    fn into_bytes(self) -> Vec<u8> {
        let r: Result<T, String> = self.into_result();
        encode(&r).unwrap_or_else(|e| {
            // Too large to send: the receiver gets the reason instead.
            encode(&Err::<T, String>(e)).expect("a reason encodes")
        })
    }

    fn from_bytes(bytes: Vec<u8>) -> Self {
        match decode::<Result<T, String>>(&bytes) {
            Ok(Ok(v)) => Wire::Ok(v),
            Ok(Err(e)) => Wire::Bad(e),
            Err(e) => Wire::Bad(e),
        }
    }
}

/// A job a trainer holds, under its assignment epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldJob {
    pub job_id: String,
    pub epoch: i64,
}

/// A node announces itself (and again after any reconnect).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Register {
    pub node: String,
    pub roles: Vec<String>,
    pub cpus: u32,
    pub gpus: u32,
    /// Random per process start. A registration under the name of a node
    /// that is alive with another incarnation is refused.
    pub incarnation: u64,
    /// Training jobs the node runs at once.
    pub slots: u32,
    /// The jobs it still runs (after a reconnect): the coordinator keeps
    /// those it still assigns to this node under that epoch.
    pub running: Vec<HeldJob>,
}

/// The coordinator accepted a registration; its timing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    pub heartbeat_secs: u64,
    pub lease_secs: u64,
}

/// A node is alive and asks to renew the leases of the jobs it holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node: String,
    pub incarnation: u64,
    pub held: Vec<HeldJob>,
}

/// What a heartbeat learned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// False: the coordinator does not know this node (it restarted, or the
    /// node was lost): register again.
    pub registered: bool,
    /// Held jobs that are no longer this node's: stop them, write nothing more.
    pub revoked: Vec<String>,
    /// Renewed leases last this long from the request.
    pub lease_secs: u64,
    /// `cordoned` or `draining` when an operator said so; empty otherwise.
    pub admin_state: String,
}

/// A (ticker, interval) job for a trainer, under an epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub ticker: String,
    pub interval: String,
    /// Monotonic per (ticker, interval); a report with an older epoch is refused.
    pub epoch: i64,
    /// The version number the checkpoint must be written as.
    pub version: i64,
    pub job_id: String,
    /// Model kind for this job; empty: the node's config.
    pub model: String,
    /// Epochs for this job; 0: the node's config.
    pub epochs: u32,
    /// Key (bucket `models`) of the job's last snapshot from an earlier
    /// attempt; empty: start from scratch.
    pub resume_key: String,
    /// 1 for the first attempt.
    pub attempt: u32,
}

/// A trainer finished a job: the checkpoint is in the object store.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointReport {
    pub node: String,
    pub ticker: String,
    pub interval: String,
    pub epoch: i64,
    pub version: i64,
    /// Object store URI of the checkpoint folder.
    pub uri: String,
    /// sha256 of model.safetensors.
    pub sha256: String,
    pub kind: String,
    /// JSON metrics (model and naive baseline, on the test split).
    pub metrics_json: String,
    pub job_id: String,
}

/// The answer to a checkpoint or failure report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointAck {
    pub accepted: bool,
    pub reason: String,
}

/// A model version predictors should serve (a new or changed champion).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelUpdate {
    pub ticker: String,
    pub interval: String,
    pub version: i64,
    pub uri: String,
    pub sha256: String,
    pub kind: String,
}

/// A trainer's progress on a job (one message per finished training epoch).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobProgress {
    pub node: String,
    pub job_id: String,
    /// The assignment epoch (fencing), not the training epoch.
    pub epoch: i64,
    pub train_epoch: u32,
    pub epochs: u32,
    pub train_loss: f64,
    pub val_loss: f64,
    /// Set when a snapshot of this training epoch was saved (bucket `models`).
    pub snapshot_key: String,
}

/// A trainer could not finish a job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobFailure {
    pub node: String,
    pub ticker: String,
    pub interval: String,
    pub epoch: i64,
    pub version: i64,
    pub job_id: String,
    pub reason: String,
}

/// Messages of the coordinator's port. Calls answer `Err(reason)` when the
/// coordinator refuses (a name held by a live process, a stale epoch) and
/// fail when it cannot be reached: the caller retries.
#[derive(RactorClusterMessage)]
pub enum CoordinatorPortMsg {
    /// A node announces itself; refused while a live process holds the name.
    #[rpc]
    Register(
        Wire<Register>,
        RpcReplyPort<Wire<Result<Registered, String>>>,
    ),
    /// Renew the leases of the held jobs; learn which ones were revoked.
    #[rpc]
    Heartbeat(
        Wire<Heartbeat>,
        RpcReplyPort<Wire<Result<HeartbeatReply, String>>>,
    ),
    /// A finished training epoch (and maybe a snapshot) of a job.
    Progress(Wire<JobProgress>),
    /// A finished job's checkpoint; refused unless it is the job's current
    /// attempt (node, epoch, version, key).
    #[rpc]
    Checkpoint(Wire<CheckpointReport>, RpcReplyPort<Wire<CheckpointAck>>),
    /// A job that could not finish; retried or failed by the coordinator.
    #[rpc]
    Failure(Wire<JobFailure>, RpcReplyPort<Wire<CheckpointAck>>),
    /// The state of a job (by id); `None` for an unknown one.
    #[rpc]
    GetJob(Wire<String>, RpcReplyPort<Wire<Option<JobStatus>>>),
}

/// Messages of a trainer pool's port.
#[derive(RactorClusterMessage)]
pub enum TrainerPortMsg {
    /// Run this job under its epoch and lease (the coordinator recorded it first).
    Assign(Wire<Assignment>),
}

/// Messages of a predictor registry's port.
#[derive(RactorClusterMessage)]
pub enum PredictorPortMsg {
    /// Serve this version of its (ticker, interval) (it supersedes any other).
    Model(Wire<ModelUpdate>),
}

/// Why a call to a port did not get an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreachable(pub String);

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_round_trips_and_garbage_is_refused_with_the_reason() {
        let a = Assignment {
            ticker: "AAPL".into(),
            interval: "5m".into(),
            epoch: 3,
            version: 7,
            job_id: "j".into(),
            ..Default::default()
        };
        let bytes = Wire::Ok(a.clone()).into_bytes();
        assert_eq!(Wire::<Assignment>::from_bytes(bytes.clone()), Wire::Ok(a));
        // A truncated message, trailing bytes, a wrong type.
        let bad = Wire::<Assignment>::from_bytes(bytes[..bytes.len() - 2].to_vec());
        assert!(
            matches!(&bad, Wire::Bad(e) if e.contains("Assignment")),
            "{bad:?}"
        );
        let mut long = bytes.clone();
        long.push(0);
        let bad = Wire::<Assignment>::from_bytes(long);
        assert!(
            matches!(&bad, Wire::Bad(e) if e.contains("trailing")),
            "{bad:?}"
        );
        let other = Wire::Ok(HeldJob {
            job_id: "x".into(),
            epoch: 1,
        })
        .into_bytes();
        assert!(matches!(
            Wire::<Assignment>::from_bytes(other),
            Wire::Bad(_)
        ));
        // A reason crosses as the reason.
        let why = Wire::<Assignment>::Bad("nope".into()).into_bytes();
        assert_eq!(
            Wire::<Assignment>::from_bytes(why),
            Wire::Bad("nope".into())
        );
    }

    #[test]
    fn oversized_payloads_are_refused_on_both_sides() {
        let huge = Wire::Ok(JobFailure {
            reason: "x".repeat(MAX_MESSAGE_BYTES + 1),
            ..Default::default()
        })
        .into_bytes();
        // The sender sent the reason instead of the message.
        match Wire::<JobFailure>::from_bytes(huge.clone()) {
            Wire::Bad(e) => assert!(e.contains("at most"), "{e}"),
            w => panic!("{w:?}"),
        }
        assert!(huge.len() < 1024);
        // A peer that sends more anyway: refused before decoding.
        let raw = vec![0u8; MAX_MESSAGE_BYTES + 10];
        match Wire::<JobFailure>::from_bytes(raw) {
            Wire::Bad(e) => assert!(e.contains("refused"), "{e}"),
            w => panic!("{w:?}"),
        }
        // A length prefix that claims more than the limit does not allocate it.
        let mut lying = vec![0u8]; // Ok variant
        lying.extend([0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]); // ~2^63 bytes of node name
        assert!(matches!(
            Wire::<JobFailure>::from_bytes(lying),
            Wire::Bad(_)
        ));
    }
}
