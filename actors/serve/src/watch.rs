//! Follows the coordinator's `WatchModels` stream and tells the predictor
//! registry about every version; reconnects with backoff when the stream
//! breaks, and stops when the registry is gone. A coordinator that refuses
//! the node's cookie stops the registry (the node exits, saying why).

use std::time::Duration;

use ractor::ActorRef;
use tickmesh_core::types::Interval;
use tickmesh_proto::auth::Link;
use tickmesh_proto::v1::WatchModelsRequest;
use tracing::{info, warn};

use crate::predictor::VersionRef;
use crate::registry::RegistryMsg;

/// Runs until the registry stops.
pub async fn follow_models(link: Link, node: String, registry: ActorRef<RegistryMsg>) {
    let coordinator = link.addr.clone();
    let mut backoff = Duration::from_millis(200);
    loop {
        let stream = async {
            let mut c = link
                .coordinator()
                .map_err(tonic::Status::invalid_argument)?;
            c.watch_models(WatchModelsRequest { node: node.clone() })
                .await
                .map(|r| r.into_inner())
        }
        .await;
        if let Err(e) = &stream {
            if e.code() == tonic::Code::Unauthenticated {
                // Retrying cannot help: the serve role stops, and its node exits saying why.
                registry.stop(Some(format!(
                    "the coordinator at {coordinator} refused this node: {} (cluster.cookie / TICKMESH_COOKIE)",
                    e.message()
                )));
                return;
            }
        }
        match stream {
            Ok(mut s) => {
                info!(%coordinator, "watching model versions");
                backoff = Duration::from_millis(200);
                loop {
                    match s.message().await {
                        Ok(Some(u)) => {
                            let Ok(interval) = u.interval.parse::<Interval>() else {
                                warn!(interval = %u.interval, "model update with a bad interval ignored");
                                continue;
                            };
                            let msg = RegistryMsg::ModelAvailable {
                                ticker: u.ticker,
                                interval,
                                version: VersionRef {
                                    version: u.version,
                                    sha256: u.sha256,
                                },
                            };
                            if registry.cast(msg).is_err() {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            warn!(error = %e, "model stream failed");
                            break;
                        }
                    }
                }
            }
            Err(e) => warn!(%coordinator, error = %e.message(), "cannot watch model versions yet"),
        }
        if registry.get_status() != ractor::ActorStatus::Running {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
