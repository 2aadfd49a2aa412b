//! Credentials and transport of tickmesh's gRPC calls.
//!
//! - [`Bearer`] adds `authorization: Bearer <secret>` (and a deadline) to
//!   every call of a client.
//! - [`Guard`] checks it on the server: the presented secret's SHA-256 is
//!   compared with the expected one's in constant time, so neither the
//!   comparison's time nor its length says how much of a guess was right.
//! - [`Link`] is how a process reaches the coordinator: address, secret and,
//!   when the port speaks TLS, the CA and name to verify it with.

use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};
use tonic::{Request, Status};

use crate::v1::admin_client::AdminClient;

/// A channel whose every call carries a [`Bearer`].
pub type Authed = InterceptedService<Channel, Bearer>;
/// A client of the `Admin` service.
pub type AdminConn = AdminClient<Authed>;

/// Replies of up to this size are read by clients (a job list, say).
pub const MAX_REPLY_BYTES: usize = 64 << 20;

/// Client side: the secret (if any) and a deadline put on every call.
#[derive(Clone, Default)]
pub struct Bearer {
    value: Option<AsciiMetadataValue>,
    deadline: Option<Duration>,
}

impl Bearer {
    /// A secret must be printable ASCII without spaces.
    pub fn new(secret: Option<&str>) -> Result<Self, String> {
        let value = match secret {
            None => None,
            Some(s) => {
                if s.is_empty() || !s.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(
                        "a token or cookie must be printable ASCII without spaces".to_string()
                    );
                }
                Some(
                    format!("Bearer {s}")
                        .parse()
                        .map_err(|e| format!("token: {e}"))?,
                )
            }
        };
        Ok(Bearer {
            value,
            deadline: None,
        })
    }

    /// Every call carries `grpc-timeout: d`: the server gives up on it then
    /// (the client sees CANCELLED or DEADLINE_EXCEEDED).
    pub fn with_deadline(mut self, d: Duration) -> Self {
        self.deadline = Some(d);
        self
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.value {
            req.metadata_mut().insert("authorization", v.clone());
        }
        if let Some(d) = self.deadline {
            req.set_timeout(d);
        }
        Ok(req)
    }
}

/// Server side: refuses calls without the expected bearer secret
/// (UNAUTHENTICATED, naming what is missing); an open guard lets every call in.
#[derive(Clone)]
pub struct Guard {
    expected: Option<[u8; 32]>,
    realm: &'static str,
}

impl Guard {
    /// `realm` names the credential in refusals ("admin token", "cluster cookie").
    pub fn new(secret: Option<&str>, realm: &'static str) -> Self {
        Guard {
            expected: secret.map(|s| Sha256::digest(s.as_bytes()).into()),
            realm,
        }
    }

    /// Whether calls need a secret.
    pub fn is_closed(&self) -> bool {
        self.expected.is_some()
    }

    /// Checks a call's metadata.
    pub fn check(&self, md: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        let Some(expected) = &self.expected else {
            return Ok(());
        };
        let Some(v) = md.get("authorization") else {
            return Err(Status::unauthenticated(format!(
                "missing `authorization: Bearer <{}>` metadata",
                self.realm
            )));
        };
        let Some(presented) = v.as_bytes().strip_prefix(b"Bearer ") else {
            return Err(Status::unauthenticated(format!(
                "the authorization metadata is not `Bearer <{}>`",
                self.realm
            )));
        };
        let digest: [u8; 32] = Sha256::digest(presented).into();
        if bool::from(digest.ct_eq(expected)) {
            Ok(())
        } else {
            Err(Status::unauthenticated(format!("wrong {}", self.realm)))
        }
    }
}

impl Interceptor for Guard {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        self.check(req.metadata())?;
        Ok(req)
    }
}

/// Makes ring rustls's process-wide crypto provider (the AWS SDK links a
/// second one, and rustls then refuses to pick). Idempotent.
pub fn install_crypto() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The server's TLS identity from PEM files.
pub fn server_tls(cert: &Path, key: &Path) -> Result<ServerTlsConfig, String> {
    install_crypto();
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    Ok(ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?)))
}

/// The ractor_cluster mesh's TLS: every node server presents `cert`/`key`
/// (PEM) and every node verifies its peers with `ca`, under `domain` when
/// set, else under each peer's own host.
#[derive(Clone)]
pub struct MeshTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub connector: tokio_rustls::TlsConnector,
    pub domain: Option<rustls_pki_types::ServerName<'static>>,
}

impl MeshTls {
    /// The name to verify the peer at `addr` (`host:port`) under.
    pub fn name_for(&self, addr: &str) -> Result<rustls_pki_types::ServerName<'static>, String> {
        if let Some(d) = &self.domain {
            return Ok(d.clone());
        }
        let host = addr
            .rsplit_once(':')
            .map_or(addr, |(h, _)| h)
            .trim_matches(['[', ']']);
        rustls_pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| format!("TLS name `{host}`: {e}"))
    }

    pub fn load(cert: &Path, key: &Path, ca: &Path, domain: Option<&str>) -> Result<Self, String> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
        install_crypto();
        let certs = CertificateDer::pem_file_iter(cert)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("{}: {e}", cert.display()))?;
        let key_der =
            PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
        let server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key_der)
            .map_err(|e| format!("{}: {e}", cert.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))? {
            roots
                .add(c.map_err(|e| format!("{}: {e}", ca.display()))?)
                .map_err(|e| format!("{}: {e}", ca.display()))?;
        }
        let client = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let domain = domain
            .map(|d| {
                ServerName::try_from(d.to_string()).map_err(|e| format!("TLS name `{d}`: {e}"))
            })
            .transpose()?;
        Ok(MeshTls {
            acceptor: tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server)),
            connector: tokio_rustls::TlsConnector::from(std::sync::Arc::new(client)),
            domain,
        })
    }
}

/// How to reach the coordinator's gRPC port.
#[derive(Clone, Default)]
pub struct Link {
    /// `host:port`.
    pub addr: String,
    /// The admin token (the Admin service), or none.
    pub secret: Option<String>,
    /// Set when the port speaks TLS.
    pub tls: Option<ClientTlsConfig>,
    /// Put on every call.
    pub deadline: Option<Duration>,
}

impl Link {
    /// A plaintext link.
    pub fn plain(addr: &str, secret: Option<&str>) -> Self {
        Link {
            addr: addr.to_string(),
            secret: secret.map(str::to_string),
            tls: None,
            deadline: None,
        }
    }

    /// Verify the server with the CA in `ca` (PEM), under the name `domain`.
    pub fn with_tls(mut self, ca: &Path, domain: &str) -> Result<Self, String> {
        let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
        self.tls = Some(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(pem))
                .domain_name(domain),
        );
        Ok(self)
    }

    /// The same link with another secret.
    pub fn with_secret(mut self, secret: Option<&str>) -> Self {
        self.secret = secret.map(str::to_string);
        self
    }

    fn endpoint(&self) -> Result<Endpoint, String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut ep = Endpoint::from_shared(format!("{scheme}://{}", self.addr))
            .map_err(|e| format!("coordinator address `{}`: {e}", self.addr))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            install_crypto();
            ep = ep
                .tls_config(tls.clone())
                .map_err(|e| format!("TLS for `{}`: {e}", self.addr))?;
        }
        Ok(ep)
    }

    fn bearer(&self) -> Result<Bearer, String> {
        let b = Bearer::new(self.secret.as_deref())?;
        Ok(match self.deadline {
            Some(d) => b.with_deadline(d),
            None => b,
        })
    }

    /// A channel that connects on first use (and again after a failure).
    pub fn lazy(&self) -> Result<Authed, String> {
        Ok(InterceptedService::new(
            self.endpoint()?.connect_lazy(),
            self.bearer()?,
        ))
    }

    /// Connects now, retrying for up to `wait`.
    pub async fn connect(&self, wait: Duration) -> Result<Authed, String> {
        let ep = self.endpoint()?;
        let start = std::time::Instant::now();
        loop {
            match ep.connect().await {
                Ok(ch) => return Ok(InterceptedService::new(ch, self.bearer()?)),
                Err(e) if start.elapsed() >= wait => {
                    return Err(format!(
                        "cannot reach the coordinator at {}: {e}{}",
                        self.addr,
                        source_chain(&e)
                    ))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// A lazy `Admin` client.
    pub fn admin(&self) -> Result<AdminConn, String> {
        Ok(AdminClient::new(self.lazy()?).max_decoding_message_size(MAX_REPLY_BYTES))
    }
}

/// `: cause: cause…` of an error's sources.
pub fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = String::new();
    let mut s = e.source();
    while let Some(c) = s {
        out.push_str(&format!(": {c}"));
        s = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(v: Option<&str>) -> tonic::metadata::MetadataMap {
        let mut m = tonic::metadata::MetadataMap::new();
        if let Some(v) = v {
            m.insert("authorization", v.parse().unwrap());
        }
        m
    }

    #[test]
    fn a_guard_wants_the_exact_secret() {
        let g = Guard::new(Some("s3cret-token"), "admin token");
        assert!(g.check(&md(Some("Bearer s3cret-token"))).is_ok());
        for bad in [
            None,
            Some("Bearer s3cret-toke"),
            Some("Bearer s3cret-token2"),
            Some("s3cret-token"),
            Some("Basic s3cret-token"),
        ] {
            let e = g.check(&md(bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        assert!(g
            .check(&md(None))
            .unwrap_err()
            .message()
            .contains("missing"));
        assert!(Guard::new(None, "cookie").check(&md(None)).is_ok());
    }

    #[test]
    fn a_bearer_refuses_secrets_that_are_not_header_safe() {
        assert!(Bearer::new(Some("two words")).is_err());
        assert!(Bearer::new(Some("")).is_err());
        assert!(Bearer::new(Some("ok-token")).is_ok());
    }
}
