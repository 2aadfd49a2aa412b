//! `CoordinatorPort`: the coordinator's face on the ractor_cluster mesh.
//! Registered as `tickmesh.SCOPE.coordinator` in the cluster's group
//! `coordinators`, so every node connected to the coordinator's node sees it. It receives
//! [`CoordinatorPortMsg`] from trainer pools and predictor nodes (register,
//! heartbeat, progress, checkpoint and failure reports, job status),
//! validates each payload, and passes it on to [`CoordinatorActor`] as a
//! local message; each call is answered by a task, so one slow answer never
//! holds up the next message, and waits no longer than its caller does (a
//! call whose caller has given up is dropped unrun). A payload that did not
//! decode, or breaks a limit, is refused with the reason.
//!
//! [`CoordinatorActor`]: crate::coordinator::CoordinatorActor

use std::time::Duration;

use ractor::{call_t, Actor, ActorCell, ActorProcessingErr, ActorRef};
use tickmesh_proto::mesh::{
    CheckpointAck, CoordinatorPortMsg, HeartbeatReply, Registered, Scope, Wire, COORDINATORS,
};
use tracing::warn;

use crate::coordinator::{CoordinatorMsg, Registration};

/// How long a port waits for the coordinator actor's answer.
pub(crate) const CALL_TIMEOUT_MS: u64 = 30_000;
/// Jobs one node may list as running or held.
const MAX_HELD: usize = 10_000;

pub struct CoordinatorPort;

#[derive(Clone)]
pub struct PortArgs {
    pub coordinator: ActorRef<CoordinatorMsg>,
    pub heartbeat: Duration,
    pub lease: Duration,
    pub scope: Scope,
}

impl CoordinatorPort {
    /// Spawns the port linked to `supervisor` (the coordinator), taking
    /// over the name from a stopped incarnation in this process; refuses to
    /// start while another node's coordinator of the cluster is on the mesh.
    pub async fn spawn(
        args: PortArgs,
        supervisor: ActorCell,
    ) -> Result<ActorCell, ActorProcessingErr> {
        let scope = args.scope.clone();
        scope
            .spawn_port(
                COORDINATORS,
                scope.coordinator_port(),
                CoordinatorPort,
                args,
                supervisor,
            )
            .await
            .map_err(|e| format!("{e}: one cluster has one coordinator").into())
    }
}

/// How long to wait for the coordinator actor on behalf of `reply`'s
/// caller: the caller's own timeout (a remote call carries it), at most
/// [`CALL_TIMEOUT_MS`]. A call whose caller has given up is not run.
fn budget<T>(reply: &ractor::RpcReplyPort<T>) -> u64 {
    reply.get_timeout().map_or(CALL_TIMEOUT_MS, |t| {
        (t.as_millis() as u64).min(CALL_TIMEOUT_MS)
    })
}

fn too_many(n: usize, what: &str) -> Result<(), String> {
    if n > MAX_HELD {
        return Err(format!("{n} {what} jobs listed; at most {MAX_HELD}"));
    }
    Ok(())
}

impl Actor for CoordinatorPort {
    type Msg = CoordinatorPortMsg;
    type State = PortArgs;
    type Arguments = PortArgs;

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        args: PortArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let c = st.coordinator.clone();
        match msg {
            CoordinatorPortMsg::Register(req, reply) => {
                let timing = Registered {
                    heartbeat_secs: st.heartbeat.as_secs(),
                    lease_secs: st.lease.as_secs(),
                };
                let ms = budget(&reply);
                tokio::spawn(async move {
                    if reply.is_closed() {
                        return;
                    }
                    let r = async {
                        let r = req.into_result()?;
                        if r.node.trim().is_empty() {
                            return Err("node name is empty".to_string());
                        }
                        too_many(r.running.len(), "running")?;
                        let reg = Registration {
                            node: r.node,
                            roles: r.roles,
                            cpus: r.cpus,
                            gpus: r.gpus,
                            slots: r.slots,
                            incarnation: r.incarnation,
                            running: r.running.into_iter().map(|h| (h.job_id, h.epoch)).collect(),
                        };
                        call_t!(c, |reply| CoordinatorMsg::Register { reg, reply }, ms)
                            .map_err(|e| format!("coordinator actor: {e}"))??;
                        Ok(timing)
                    }
                    .await;
                    if let Err(e) = &r {
                        warn!(reason = %e, "registration refused");
                    }
                    let _ = reply.send(Wire::Ok(r));
                });
            }
            CoordinatorPortMsg::Heartbeat(req, reply) => {
                let lease_secs = st.lease.as_secs();
                let ms = budget(&reply);
                tokio::spawn(async move {
                    if reply.is_closed() {
                        return;
                    }
                    let r = async {
                        let r = req.into_result()?;
                        too_many(r.held.len(), "held")?;
                        let held = r.held.into_iter().map(|h| (h.job_id, h.epoch)).collect();
                        let out = call_t!(
                            c,
                            |reply| CoordinatorMsg::Heartbeat {
                                node: r.node,
                                incarnation: r.incarnation,
                                held,
                                reply
                            },
                            ms
                        )
                        .map_err(|e| format!("coordinator actor: {e}"))??;
                        Ok(HeartbeatReply {
                            registered: out.registered,
                            revoked: out.revoked,
                            lease_secs,
                            admin_state: out.admin_state,
                        })
                    }
                    .await;
                    let _ = reply.send(Wire::Ok(r));
                });
            }
            CoordinatorPortMsg::Progress(p) => match p.into_result() {
                Ok(p) => c.cast(CoordinatorMsg::Progress(p))?,
                Err(e) => warn!(reason = %e, "progress report refused"),
            },
            CoordinatorPortMsg::Checkpoint(report, reply) => {
                answer_ack(c, report, reply, |report, reply| CoordinatorMsg::Report {
                    report,
                    reply,
                })
            }
            CoordinatorPortMsg::Failure(failure, reply) => {
                answer_ack(c, failure, reply, |failure, reply| {
                    CoordinatorMsg::Failure { failure, reply }
                })
            }
            CoordinatorPortMsg::GetJob(id, reply) => {
                let ms = budget(&reply);
                tokio::spawn(async move {
                    if reply.is_closed() {
                        return;
                    }
                    let job = match id.into_result() {
                        Ok(id) => call_t!(c, |reply| CoordinatorMsg::GetJob { id, reply }, ms)
                            .map_err(|e| format!("coordinator actor: {e}")),
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(match job {
                        Ok(j) => Wire::Ok(j),
                        Err(e) => Wire::Bad(e),
                    });
                });
            }
        }
        Ok(())
    }
}

/// Answers a report with the coordinator actor's ack (in a task, within the
/// caller's budget); a payload that did not decode is refused with the reason.
fn answer_ack<P: Send + 'static>(
    c: ActorRef<CoordinatorMsg>,
    payload: Wire<P>,
    reply: ractor::RpcReplyPort<Wire<CheckpointAck>>,
    msg: fn(P, ractor::RpcReplyPort<CheckpointAck>) -> CoordinatorMsg,
) {
    let ms = budget(&reply);
    tokio::spawn(async move {
        if reply.is_closed() {
            return;
        }
        let ack = match payload.into_result() {
            Ok(p) => call_t!(c, |r| msg(p, r), ms)
                .unwrap_or_else(|e| refused(format!("coordinator actor: {e}"))),
            Err(e) => refused(e),
        };
        let _ = reply.send(Wire::Ok(ack));
    });
}

fn refused(reason: String) -> CheckpointAck {
    CheckpointAck {
        accepted: false,
        reason,
    }
}
