//! The ractor_cluster mesh, the cluster's one membership: every node of
//! `tickmesh run` that has a `cluster_port` starts a `NodeServer` on it and
//! a `NodeAgent` in the process group `tickmesh.nodes`; nodes other than the
//! seed (the first coordinator node with a cluster port) keep a [`link`] to
//! the seed, and the mesh is transitive. Trainer pools, predictor
//! registries and the coordinator talk through their ports on it (see
//! `tickmesh_proto::mesh` and docs/mesh-protocol.md).
//!
//! A link reconnects with a jittered, doubling backoff whenever its session
//! ends; a peer that refuses the handshake (a wrong cookie) fails the link
//! with that reason, and the node's supervisor decides. [`watch_sessions`]
//! closes sessions whose peer stopped answering (a dead host, a cut
//! network), so that links dial again and the coordinator sees the node go.
//! A connection that has not authenticated within [`HANDSHAKE_TIMEOUT`] is
//! closed.
//! `NodeAgentMsg::Describe` is a remote RPC whose reply is encoded with
//! bincode, so any member can ask every other one what it is. With
//! `[cluster] tls_*` the mesh speaks TLS only, and each node links to every
//! other configured node itself.

use std::time::Duration;

use anyhow::{anyhow, Result};
use ractor::{call_t, Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::node::NodeConnectionMode;
use ractor_cluster::node::NodeServerSessionInformation;
use ractor_cluster::{BytesConvertable, NodeServer, NodeServerMessage, RactorClusterMessage};
use serde::{Deserialize, Serialize};
use tickmesh_core::config::ClusterConfig;
use tickmesh_proto::auth::MeshTls;
use tokio::sync::broadcast;
use tracing::{info, warn};

/// The process group every node agent joins.
pub const NODES_GROUP: &str = "tickmesh.nodes";

/// What a node says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeDescription {
    pub node: String,
    pub roles: Vec<String>,
    pub coordinator: Option<String>,
    pub http: Option<String>,
    pub pid: u32,
}

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

impl BytesConvertable for NodeDescription {
    fn into_bytes(self) -> Vec<u8> {
        bincode::serde::encode_to_vec(&self, bincode_config())
            .expect("a NodeDescription always encodes")
    }
    fn from_bytes(bytes: Vec<u8>) -> Self {
        // The trait is infallible; a peer sending garbage is a protocol
        // violation, and the remote call fails with the panic.
        bincode::serde::decode_from_slice(&bytes, bincode_config())
            .expect("a NodeDescription from a tickmesh peer")
            .0
    }
}

/// Messages of [`NodeAgent`]; they cross nodes.
#[derive(RactorClusterMessage)]
pub enum NodeAgentMsg {
    /// Say what this node is.
    #[rpc]
    Describe(RpcReplyPort<NodeDescription>),
}

/// Answers `Describe` for its node.
pub struct NodeAgent;

impl Actor for NodeAgent {
    type Msg = NodeAgentMsg;
    type State = NodeDescription;
    type Arguments = NodeDescription;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        d: NodeDescription,
    ) -> Result<Self::State, ActorProcessingErr> {
        ractor::pg::join(NODES_GROUP.to_string(), vec![myself.get_cell()]);
        Ok(d)
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: Self::Msg,
        d: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            NodeAgentMsg::Describe(reply) => {
                let _ = reply.send(d.clone());
            }
        }
        Ok(())
    }
}

/// The mesh's TLS from `[cluster] tls_*`; `None` when the mesh is plaintext.
pub fn mesh_tls(cfg: &ClusterConfig) -> Result<Option<MeshTls>> {
    let c = &cfg.cluster;
    let (Some(cert), Some(key), Some(ca)) = (&c.tls_cert_file, &c.tls_key_file, &c.tls_ca_file)
    else {
        return Ok(None);
    };
    MeshTls::load(cert, key, ca, c.tls_domain.as_deref())
        .map(Some)
        .map_err(|e| anyhow!("cluster.tls_*: {e}"))
}

/// This process's node server and what happens to its sessions.
#[derive(Clone)]
pub struct Mesh {
    pub server: ActorRef<NodeServerMessage>,
    events: broadcast::Sender<SessionEvent>,
}

/// A mesh session's step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Authenticated,
    Disconnected,
}

#[derive(Debug, Clone)]
struct SessionEvent {
    step: Step,
    /// This node dialled the peer (a link's own connection).
    outgoing: bool,
    peer_addr: String,
}

/// Sends every session's steps to the links.
struct Events(broadcast::Sender<SessionEvent>);

impl Events {
    fn send(&self, step: Step, ses: &NodeServerSessionInformation) {
        let _ = self.0.send(SessionEvent {
            step,
            outgoing: !ses.is_server,
            peer_addr: ses.peer_addr.clone(),
        });
    }
}

impl ractor_cluster::NodeEventSubscription for Events {
    fn node_session_opened(&self, _: NodeServerSessionInformation) {}

    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        self.send(Step::Disconnected, &ses);
    }

    fn node_session_authenticated(&self, ses: NodeServerSessionInformation) {
        self.send(Step::Authenticated, &ses);
    }
}

/// Starts this process's node server on `port` (127.0.0.1 when `host` is).
/// With TLS the server accepts TLS only, and the node connects to its peers
/// itself (ractor_cluster's transitive connections are plaintext).
pub async fn start_server(
    name: &str,
    cookie: &str,
    host: &str,
    port: u16,
    tls: Option<&MeshTls>,
) -> Result<Mesh> {
    let (encryption, mode) = match tls {
        Some(t) => (
            Some(ractor_cluster::IncomingEncryptionMode::Tls(
                t.acceptor.clone(),
            )),
            NodeConnectionMode::Isolated,
        ),
        None => (None, NodeConnectionMode::Transitive),
    };
    let mut server = NodeServer::new(
        port,
        cookie.to_string(),
        name.to_string(),
        host.to_string(),
        encryption,
        Some(mode),
    );
    if let Ok(ip) = host.parse() {
        server = server.with_listen_addr(ip);
    }
    let (server, _) = Actor::spawn(None, server, ())
        .await
        .map_err(|e| anyhow!("ractor_cluster node server on {host}:{port}: {e}"))?;
    server
        .cast(NodeServerMessage::SubscribeToEvents {
            id: "handshake-guard".into(),
            subscription: Box::new(HandshakeGuard {
                timeout: HANDSHAKE_TIMEOUT,
            }),
        })
        .map_err(|e| anyhow!("ractor_cluster node server: {e}"))?;
    let (events, _) = broadcast::channel(256);
    server
        .cast(NodeServerMessage::SubscribeToEvents {
            id: "links".into(),
            subscription: Box::new(Events(events.clone())),
        })
        .map_err(|e| anyhow!("ractor_cluster node server: {e}"))?;
    Ok(Mesh { server, events })
}

/// How long an incoming mesh connection may take to authenticate.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Closes mesh sessions that have not authenticated within `timeout` (a
/// stranger that connects and says nothing, or a peer with a wrong cookie):
/// ractor_cluster itself would keep them open for ever.
struct HandshakeGuard {
    timeout: Duration,
}

impl ractor_cluster::NodeEventSubscription for HandshakeGuard {
    fn node_session_opened(&self, ses: ractor_cluster::node::NodeServerSessionInformation) {
        let timeout = self.timeout;
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let authenticated = call_t!(
                ses.actor,
                ractor_cluster::NodeSessionMessage::GetAuthenticationState,
                1_000
            )
            .unwrap_or(false);
            if !authenticated && ses.actor.get_status() == ractor::ActorStatus::Running {
                warn!(peer = %ses.peer_addr, timeout_s = timeout.as_secs(), "mesh connection not authenticated in time; closed (wrong cookie?)");
                ses.actor.stop(Some("handshake timeout".into()));
            }
        });
    }

    fn node_session_disconnected(&self, _: ractor_cluster::node::NodeServerSessionInformation) {}

    fn node_session_authenticated(&self, _: ractor_cluster::node::NodeServerSessionInformation) {}
}

/// Opens a mesh connection to the node server at `addr` (over TLS when given).
pub async fn connect(
    server: &ActorRef<NodeServerMessage>,
    addr: &str,
    tls: Option<&MeshTls>,
) -> Result<()> {
    match tls {
        Some(t) => {
            let name = t.name_for(addr).map_err(|e| anyhow!("{e}"))?;
            ractor_cluster::client_connect_enc(server, addr, t.connector.clone(), name).await
        }
        None => ractor_cluster::client_connect(server, addr).await,
    }
    .map_err(|e| anyhow!("cannot reach the mesh node at {addr}: {e}"))
}

/// Whether this node has an authenticated session with the node named
/// `peer`; `None` when the node server did not answer in time (it is busy:
/// ask again). Err when the node server has stopped.
async fn connected(
    server: &ActorRef<NodeServerMessage>,
    peer: &str,
) -> Result<Option<bool>, String> {
    let sessions = match call_t!(server, NodeServerMessage::GetSessions, 5_000) {
        Ok(s) => s,
        Err(e) if server.get_status() == ractor::ActorStatus::Running => {
            warn!(error = %e, "this node's mesh server is slow to answer");
            return Ok(None);
        }
        Err(e) => return Err(format!("this node's mesh server has stopped: {e}")),
    };
    // ractor_cluster names a node `NAME@HOST`.
    Ok(Some(sessions.values().any(|s| {
        s.peer_name
            .as_ref()
            .is_some_and(|n| n.name.split('@').next() == Some(peer))
    })))
}

/// Keeps this node connected to the mesh node `peer` at `addr` until
/// `shutdown`: connects, and connects again with a jittered, doubling
/// backoff (200 ms to 5 s) whenever the session ends (also when
/// [`watch_sessions`] closed it because the peer stopped answering) or the
/// peer cannot be reached. Fails when the peer refuses the handshake
/// [`REFUSALS`] times in a row (each session ends before it authenticated,
/// and no other session with the peer exists): a wrong cookie, which
/// retrying cannot fix.
pub async fn link(
    mesh: Mesh,
    peer: String,
    addr: String,
    tls: Option<MeshTls>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    tokio::select! {
        r = keep_linked(&mesh, &peer, &addr, tls.as_ref()) => r,
        _ = shutdown => Ok(()),
    }
}

async fn keep_linked(
    mesh: &Mesh,
    peer: &str,
    addr: &str,
    tls: Option<&MeshTls>,
) -> Result<(), String> {
    let mut wait = Duration::from_millis(200);
    let mut first = true;
    let mut refusals = 0;
    loop {
        if !first {
            let jitter = rand::random::<u64>() % (wait.as_millis() as u64 / 2 + 1);
            tokio::time::sleep(wait + Duration::from_millis(jitter)).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
        first = false;
        if connected(&mesh.server, peer).await? != Some(true) {
            let mut events = mesh.events.subscribe();
            if let Err(e) = connect(&mesh.server, addr, tls).await {
                warn!(%peer, error = %e, "cannot reach the mesh peer yet");
                continue;
            }
            let dialled: Vec<String> = tokio::net::lookup_host(addr)
                .await
                .map(|a| a.map(|a| a.to_string()).collect())
                .unwrap_or_default();
            let handshake =
                tokio::time::timeout(HANDSHAKE_TIMEOUT + Duration::from_secs(2), async {
                    loop {
                        match events.recv().await {
                            Ok(e) if e.outgoing && dialled.contains(&e.peer_addr) => {
                                return e.step == Step::Authenticated
                            }
                            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                            Err(broadcast::error::RecvError::Closed) => return false,
                        }
                    }
                })
                .await;
            if handshake != Ok(true) {
                // Both ends may have dialled each other: one session survives.
                tokio::time::sleep(Duration::from_secs(1)).await;
                if connected(&mesh.server, peer).await? == Some(false) {
                    // A peer that is going down, or one that kept a stale
                    // session with us, closes too: only a repeated refusal
                    // is one.
                    refusals += 1;
                    if refusals >= REFUSALS {
                        return Err(format!(
                            "the mesh node `{peer}` at {addr} refused this node's handshake {refusals} times in a row: wrong cluster.cookie (TICKMESH_COOKIE){}?",
                            if tls.is_some() { " or TLS identity" } else { "" }
                        ));
                    }
                    warn!(%peer, %addr, "the mesh peer closed the connection before the handshake finished; trying again");
                    continue;
                }
            }
        }
        info!(%peer, %addr, tls = tls.is_some(), "linked to the mesh peer");
        wait = Duration::from_millis(200);
        refusals = 0;
        while connected(&mesh.server, peer).await? != Some(false) {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        warn!(%peer, %addr, "the mesh session to the peer ended; reconnecting");
    }
}

/// Refused handshakes in a row after which a link gives up.
pub const REFUSALS: u32 = 2;

/// How often [`watch_sessions`] asks each peer's agent whether it is alive.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long a peer has to answer a probe.
const PROBE_TIMEOUT_MS: u64 = 1_500;
/// A session whose peer has answered no probe for this long is closed.
pub const SILENCE: Duration = Duration::from_secs(6);

/// Closes mesh sessions whose peer has stopped answering, until `shutdown`.
/// ractor_cluster's own pings never time a session out, and a peer whose
/// host died or whose network was cut sends no FIN: without this, such a
/// session would look alive until TCP gives up (about 15 minutes), and the
/// link would never dial again. Every [`PROBE_EVERY`], each peer's
/// `NodeAgent` is asked `Describe`; a session whose peer has answered none
/// for [`SILENCE`] is stopped (its ports leave their groups, and a link to
/// that peer reconnects). Err only when the node server has stopped.
pub async fn watch_sessions(
    mesh: Mesh,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    tokio::select! {
        r = reap(&mesh) => r,
        _ = shutdown => Ok(()),
    }
}

async fn reap(mesh: &Mesh) -> Result<(), String> {
    // When each session's peer last answered (or was first seen).
    let mut heard: std::collections::HashMap<u64, std::time::Instant> = Default::default();
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let sessions = match call_t!(mesh.server, NodeServerMessage::GetSessions, 5_000) {
            Ok(s) => s,
            Err(e) if mesh.server.get_status() == ractor::ActorStatus::Running => {
                warn!(error = %e, "this node's mesh server is slow to answer");
                continue;
            }
            Err(e) => return Err(format!("this node's mesh server has stopped: {e}")),
        };
        let agents = ractor::pg::get_members(&NODES_GROUP.to_string());
        let probes = sessions.into_iter().filter_map(|(node_id, ses)| {
            // The peer's agent is a stub of that session (same node id).
            let agent = agents.iter().find(|c| {
                matches!(c.get_id(), ractor::ActorId::Remote { node_id: n, .. } if n == node_id)
            })?;
            let agent: ActorRef<NodeAgentMsg> = agent.clone().into();
            Some(async move {
                let ok = call_t!(agent, NodeAgentMsg::Describe, PROBE_TIMEOUT_MS).is_ok();
                (node_id, ses, ok)
            })
        });
        let results = futures::future::join_all(probes).await;
        heard.retain(|id, _| results.iter().any(|(n, _, _)| n == id));
        let now = std::time::Instant::now();
        for (node_id, ses, ok) in results {
            let last = heard.entry(node_id).or_insert(now);
            if ok {
                *last = now;
                continue;
            }
            let silent = now.duration_since(*last);
            if silent >= SILENCE {
                let peer = ses.peer_name.as_ref().map(|n| n.name.clone());
                warn!(peer = ?peer, addr = %ses.peer_addr, silent_s = silent.as_secs_f64(), "the mesh peer stopped answering; its session is closed");
                ses.actor.stop(Some("the peer stopped answering".into()));
                heard.remove(&node_id);
            }
        }
    }
}

/// The mesh nodes (name, address) this node links to: the seed (the rest
/// follows transitively), or with TLS every other node with a `cluster_port`.
pub fn peers(cfg: &ClusterConfig, me: &str, tls: bool) -> Vec<(String, String)> {
    if tls {
        cfg.nodes
            .iter()
            .filter(|n| n.name != me)
            .filter_map(|n| Some((n.name.clone(), n.cluster_addr()?)))
            .collect()
    } else {
        cfg.cluster_seed()
            .filter(|(s, _)| s != me)
            .into_iter()
            .collect()
    }
}

/// Spawns this node's agent.
pub async fn start_agent(d: NodeDescription) -> Result<ActorRef<NodeAgentMsg>> {
    let (agent, _) = Actor::spawn(None, NodeAgent, d).await?;
    Ok(agent)
}

/// Asks every agent in the mesh (local ones excluded) to describe its node,
/// waiting up to `wait` for at least one to appear.
pub async fn describe_remote_nodes(wait: Duration) -> Result<Vec<NodeDescription>> {
    let start = std::time::Instant::now();
    let remote = || -> Vec<ractor::ActorCell> {
        ractor::pg::get_members(&NODES_GROUP.to_string())
            .into_iter()
            .filter(|c| !c.get_id().is_local())
            .collect()
    };
    loop {
        let mut members = remote();
        if !members.is_empty() {
            // Group membership arrives node by node: give the rest a moment.
            tokio::time::sleep(Duration::from_secs(1)).await;
            members = remote();
        }
        if !members.is_empty() || start.elapsed() > wait {
            let mut out = Vec::new();
            for cell in members {
                let agent: ActorRef<NodeAgentMsg> = cell.into();
                out.push(
                    call_t!(agent, NodeAgentMsg::Describe, 5_000)
                        .map_err(|e| anyhow!("describe: {e}"))?,
                );
            }
            out.sort_by(|a, b| a.node.cmp(&b.node));
            return Ok(out);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
