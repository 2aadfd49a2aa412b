//! Follows the coordinator's `WatchModels` stream and tells the predictor
//! registry about every version; reconnects with backoff when the stream
//! breaks. It runs as a supervised task of its node; a coordinator that
//! refuses the node's cookie makes it fail with the reason.

use std::time::Duration;

use tickmesh_core::supervision::Slot;
use tickmesh_core::types::Interval;
use tickmesh_proto::auth::Link;
use tickmesh_proto::v1::WatchModelsRequest;
use tracing::{info, warn};

use crate::predictor::VersionRef;
use crate::registry::RegistryMsg;

/// Runs until `shutdown`; Err when the coordinator refuses this node.
pub async fn follow_models(
    link: Link,
    node: String,
    registry: Slot<RegistryMsg>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    tokio::select! {
        r = follow(link, node, registry) => r,
        _ = shutdown => Ok(()),
    }
}

async fn follow(link: Link, node: String, registry: Slot<RegistryMsg>) -> Result<(), String> {
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
                // Retrying cannot help: the watcher fails, and its supervisor decides.
                return Err(format!(
                    "the coordinator at {coordinator} refused this node: {} (cluster.cookie / TICKMESH_COOKIE)",
                    e.message()
                ));
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
                            // A registry being restarted reads the champions itself.
                            if let Some(r) = registry.get() {
                                let _ = r.cast(msg);
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
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
