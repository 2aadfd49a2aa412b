//! ractor_cluster membership: every node of `tickmesh run` that has a
//! `cluster_port` starts a `NodeServer` on it and a `NodeAgent` in the
//! process group `tickmesh.nodes`; nodes other than the seed (the first
//! coordinator node with a cluster port) connect to the seed, and the mesh
//! is transitive. `NodeAgentMsg::Describe` is a remote RPC whose reply is
//! encoded with bincode, so any member can ask every other one what it is.
//! A connection that has not authenticated (the cookie) within
//! [`HANDSHAKE_TIMEOUT`] is closed. With `[cluster] tls_*` the mesh speaks
//! TLS only, and each node connects to every other configured node itself.

use std::time::Duration;

use anyhow::{anyhow, Result};
use ractor::{call_t, Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::node::NodeConnectionMode;
use ractor_cluster::{BytesConvertable, NodeServer, NodeServerMessage, RactorClusterMessage};
use serde::{Deserialize, Serialize};
use tickmesh_core::config::ClusterConfig;
use tickmesh_proto::auth::MeshTls;
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

/// Starts this process's node server on `port` (127.0.0.1 when `host` is).
/// With TLS the server accepts TLS only, and the node connects to its peers
/// itself (ractor_cluster's transitive connections are plaintext).
pub async fn start_server(
    name: &str,
    cookie: &str,
    host: &str,
    port: u16,
    tls: Option<&MeshTls>,
) -> Result<ActorRef<NodeServerMessage>> {
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
    Ok(server)
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

/// Connects to `peer`, retrying in the background until it answers.
pub fn join(server: ActorRef<NodeServerMessage>, peer: String, tls: Option<MeshTls>) {
    tokio::spawn(async move {
        let mut wait = Duration::from_millis(200);
        loop {
            match connect(&server, &peer, tls.as_ref()).await {
                Ok(()) => {
                    info!(%peer, tls = tls.is_some(), "joined the cluster");
                    return;
                }
                Err(e) => {
                    warn!(%peer, error = %e, "cannot reach the cluster peer yet");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    });
}

/// The mesh addresses this node connects to: the seed (the rest follows
/// transitively), or with TLS every other node with a `cluster_port`.
pub fn peers(cfg: &ClusterConfig, me: &str, tls: bool) -> Vec<String> {
    if tls {
        cfg.nodes
            .iter()
            .filter(|n| n.name != me)
            .filter_map(|n| n.cluster_addr())
            .collect()
    } else {
        cfg.cluster_seed()
            .filter(|(s, _)| s != me)
            .map(|(_, a)| a)
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
