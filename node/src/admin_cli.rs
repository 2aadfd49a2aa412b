//! `tickmesh admin …`: one subcommand per `tickmesh.v1.Admin` method, plus
//! the operator chores that are not calls (topics, buckets, the mesh).
//! Calls carry the admin token (`TICKMESH_ADMIN_TOKEN`, `[admin]
//! token_file`, or an embedded coordinator's `{data_dir}/admin.token`) and
//! the `[admin] deadline_secs` deadline; a refusal exits non-zero with the
//! gRPC code and the coordinator's message.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use tickmesh_core::config::ClusterConfig;
use tickmesh_core::types::{topics, Interval};
use tickmesh_proto::auth::AdminConn;
use tickmesh_proto::v1::admin_client::AdminClient;
use tickmesh_proto::v1::*;

use crate::cluster;
use crate::roles::{admin_deadline, client_admin_token, coordinator_link};

#[derive(Subcommand)]
pub enum AdminCmd {
    /// Trainer nodes the coordinator knows: state, slots, running jobs (Admin.ListNodes).
    Nodes,
    /// Jobs, newest first (Admin.ListJobs).
    Jobs {
        /// queued, assigned, done or failed (repeatable; default all).
        #[arg(long = "state")]
        states: Vec<String>,
        #[arg(long, default_value = "")]
        ticker: String,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Registered model versions (Admin.ListModels).
    Models {
        #[arg(long, default_value = "")]
        ticker: String,
        #[arg(long)]
        interval: Option<Interval>,
        /// Every version, not only champions.
        #[arg(long)]
        all: bool,
    },
    /// Model events, newest first (Admin.ListModelEvents): promotions,
    /// rejections by the gate, operators' promotions and rollbacks, and the
    /// serve nodes' served, refused and retried versions.
    Events {
        #[arg(long, default_value = "")]
        ticker: String,
        #[arg(long)]
        interval: Option<Interval>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Train tickers now (Admin.Train).
    Train {
        #[arg(long, value_delimiter = ',', required = true)]
        tickers: Vec<String>,
        #[arg(long, default_value = "1d")]
        interval: Interval,
        /// lstm_attention, gru or cnn_lstm (default: the trainers' config).
        #[arg(long, default_value = "")]
        model: String,
        /// Epochs (default: the trainers' config).
        #[arg(long, default_value_t = 0)]
        epochs: u32,
    },
    /// Train a ticker again with its champion's model kind (Admin.Retrain).
    Retrain {
        #[arg(long)]
        ticker: String,
        #[arg(long)]
        interval: Interval,
        #[arg(long, default_value_t = 0)]
        epochs: u32,
    },
    /// Make a registered version the champion (Admin.Promote).
    Promote {
        #[arg(long)]
        ticker: String,
        #[arg(long)]
        interval: Interval,
        #[arg(long)]
        version: i64,
    },
    /// Put back the previous champion (Admin.Rollback).
    Rollback {
        #[arg(long)]
        ticker: String,
        #[arg(long)]
        interval: Interval,
    },
    /// NOT_SERVING, nothing new assigned; running jobs finish, or move with --handoff (Admin.Drain).
    Drain {
        node: String,
        #[arg(long)]
        handoff: bool,
    },
    /// Nothing new assigned to NODE, or assignable again with --uncordon (Admin.Cordon).
    Cordon {
        node: String,
        #[arg(long)]
        uncordon: bool,
    },
    /// Aggregate tickers now on an aggregate node (Admin.Aggregate); no tickers: every active one.
    Aggregate {
        #[arg(long, value_delimiter = ',')]
        tickers: Vec<String>,
        #[arg(long, default_value = "1d")]
        interval: Interval,
        /// Wait until it is done (exit 1 when it failed), at most this many seconds.
        #[arg(long)]
        wait: Option<u64>,
    },
    /// The newest aggregations, requested or automatic (Admin.ListAggregations).
    Aggregations {
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Create every Kafka topic of the pipeline (with the configured prefix).
    CreateTopics {
        #[arg(long, default_value_t = 1)]
        partitions: i32,
    },
    /// Create every S3 bucket of the pipeline (with the configured prefix).
    CreateBuckets,
    /// The ractor_cluster mesh: every node, its roles and addresses (joins through the seed).
    Mesh {
        /// Port for this command's own node server (0: any).
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
}

/// An Admin client of the configured coordinator, connected.
pub async fn client(cfg: &ClusterConfig) -> Result<AdminConn> {
    let token = client_admin_token(cfg)?;
    let mut link = coordinator_link(cfg, &cfg.coordinator.listen, Some(&token))?;
    link.deadline = Some(admin_deadline(cfg));
    let ch = link
        .connect(Duration::from_secs(5))
        .await
        .map_err(|e| anyhow!("{e} (coordinator.listen)"))?;
    Ok(AdminClient::new(ch).max_decoding_message_size(tickmesh_proto::auth::MAX_REPLY_BYTES))
}

/// `Admin.Method: CODE: message`.
fn refused(method: &str) -> impl Fn(tonic::Status) -> anyhow::Error + '_ {
    move |s| anyhow!("Admin.{method}: {:?}: {}", s.code(), s.message())
}

fn print_aggregation(a: &AggregationStatus) {
    let tickers = if a.tickers.is_empty() {
        "(every active ticker)".to_string()
    } else {
        a.tickers.join(",")
    };
    println!(
        "{} {:<8} {:<4} {:<8} {} {tickers} {}",
        a.id, a.trigger, a.interval, a.state, a.created_at, a.outcome
    );
}

fn print_model(m: &ModelInfo) {
    println!(
        "{:<8} {:<4} v{:<5} {:<15} {:<12} {}  {}",
        m.ticker, m.interval, m.version, m.kind, m.status, m.created_at, m.uri
    );
    // The promotion gate's verdict, under each version it decided.
    if let Some(why) = serde_json::from_str::<serde_json::Value>(&m.metrics_json)
        .ok()
        .and_then(|v| v["gate"]["reason"].as_str().map(str::to_string))
    {
        println!("         gate: {why}");
    }
}

fn print_started(r: &StartTrainingReply) {
    for id in &r.job_ids {
        println!("job {id}");
    }
    for why in &r.refused {
        println!("refused {why}");
    }
    println!("{} jobs queued", r.queued);
}

fn print_node(n: &NodeInfo) {
    let seen = if n.last_seen_secs < 0.0 {
        "-".to_string()
    } else {
        format!("{:.1}s ago", n.last_seen_secs)
    };
    println!(
        "{:<16} {:<9} slots {:<3} gpus {:<2} cpus {:<3} running {:<3} seen {:<10} {}",
        n.node,
        n.state,
        n.slots,
        n.gpus,
        n.cpus,
        n.running.len(),
        seen,
        n.running.join(",")
    );
}

pub async fn run(cfg: &ClusterConfig, cmd: AdminCmd) -> Result<()> {
    match cmd {
        AdminCmd::Nodes => {
            let r = client(cfg)
                .await?
                .list_nodes(ListNodesRequest {})
                .await
                .map_err(refused("ListNodes"))?
                .into_inner();
            for n in &r.nodes {
                print_node(n);
            }
            println!("{} nodes", r.nodes.len());
        }
        AdminCmd::Jobs {
            states,
            ticker,
            limit,
        } => {
            let r = client(cfg)
                .await?
                .list_jobs(ListJobsRequest {
                    states,
                    ticker,
                    limit,
                })
                .await
                .map_err(refused("ListJobs"))?
                .into_inner();
            for j in &r.jobs {
                println!(
                    "{:<36} {:<8} {:<4} {:<8} attempts {} epoch {:<3} node {:<14} v{:<4} {}",
                    j.job_id,
                    j.ticker,
                    j.interval,
                    j.state,
                    j.attempts,
                    j.epoch,
                    if j.node.is_empty() { "-" } else { &j.node },
                    j.version,
                    j.reason
                );
            }
            println!("{} jobs", r.jobs.len());
        }
        AdminCmd::Models {
            ticker,
            interval,
            all,
        } => {
            let r = client(cfg)
                .await?
                .list_models(ListModelsRequest {
                    ticker,
                    interval: interval.map(|i| i.to_string()).unwrap_or_default(),
                    all_versions: all,
                })
                .await
                .map_err(refused("ListModels"))?
                .into_inner();
            for m in &r.models {
                print_model(m);
            }
            println!("{} models", r.models.len());
        }
        AdminCmd::Events {
            ticker,
            interval,
            limit,
        } => {
            let r = client(cfg)
                .await?
                .list_model_events(ListModelEventsRequest {
                    ticker,
                    interval: interval.map(|i| i.to_string()).unwrap_or_default(),
                    limit,
                })
                .await
                .map_err(refused("ListModelEvents"))?
                .into_inner();
            for e in &r.events {
                println!(
                    "{}  {:<8} {:<4} v{:<5} {:<20} {:<12} {}",
                    e.at, e.ticker, e.interval, e.version, e.kind, e.node, e.detail
                );
            }
            println!("{} events", r.events.len());
        }
        AdminCmd::Train {
            tickers,
            interval,
            model,
            epochs,
        } => {
            let r = client(cfg)
                .await?
                .train(StartTrainingRequest {
                    tickers,
                    interval: interval.to_string(),
                    model,
                    epochs,
                })
                .await
                .map_err(refused("Train"))?
                .into_inner();
            print_started(&r);
        }
        AdminCmd::Aggregate {
            tickers,
            interval,
            wait,
        } => {
            let mut c = client(cfg).await?;
            let mut a = c
                .aggregate(StartAggregationRequest {
                    tickers,
                    interval: interval.to_string(),
                })
                .await
                .map_err(refused("Aggregate"))?
                .into_inner();
            print_aggregation(&a);
            if let Some(secs) = wait {
                let until = std::time::Instant::now() + Duration::from_secs(secs);
                while a.state == "queued" || a.state == "running" {
                    if std::time::Instant::now() > until {
                        bail!("aggregation {} still {} after {secs} s", a.id, a.state);
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    a = c
                        .get_aggregation(GetAggregationRequest { id: a.id.clone() })
                        .await
                        .map_err(refused("GetAggregation"))?
                        .into_inner();
                }
                print_aggregation(&a);
                if a.state != "done" {
                    bail!("aggregation {} failed: {}", a.id, a.outcome);
                }
            }
        }
        AdminCmd::Aggregations { limit } => {
            let r = client(cfg)
                .await?
                .list_aggregations(ListAggregationsRequest { limit })
                .await
                .map_err(refused("ListAggregations"))?
                .into_inner();
            for a in &r.aggregations {
                print_aggregation(a);
            }
        }
        AdminCmd::Retrain {
            ticker,
            interval,
            epochs,
        } => {
            let r = client(cfg)
                .await?
                .retrain(RetrainRequest {
                    ticker,
                    interval: interval.to_string(),
                    epochs,
                })
                .await
                .map_err(refused("Retrain"))?
                .into_inner();
            print_started(&r);
        }
        AdminCmd::Promote {
            ticker,
            interval,
            version,
        } => {
            let m = client(cfg)
                .await?
                .promote(PromoteRequest {
                    ticker,
                    interval: interval.to_string(),
                    version,
                })
                .await
                .map_err(refused("Promote"))?
                .into_inner();
            print_model(&m);
        }
        AdminCmd::Rollback { ticker, interval } => {
            let m = client(cfg)
                .await?
                .rollback(RollbackRequest {
                    ticker,
                    interval: interval.to_string(),
                })
                .await
                .map_err(refused("Rollback"))?
                .into_inner();
            print_model(&m);
        }
        AdminCmd::Drain { node, handoff } => {
            let n = client(cfg)
                .await?
                .drain(DrainRequest { node, handoff })
                .await
                .map_err(refused("Drain"))?
                .into_inner();
            print_node(&n);
        }
        AdminCmd::Cordon { node, uncordon } => {
            let n = client(cfg)
                .await?
                .cordon(CordonRequest { node, uncordon })
                .await
                .map_err(refused("Cordon"))?
                .into_inner();
            print_node(&n);
        }
        AdminCmd::CreateTopics { partitions } => {
            tickmesh_io::bus::kafka_create_topics(
                &cfg.kafka.brokers,
                &cfg.kafka.topic_prefix,
                topics::ALL,
                partitions,
            )
            .await?;
            println!("topics ready on {}", cfg.kafka.brokers);
        }
        AdminCmd::CreateBuckets => {
            tickmesh_io::store::S3Store::new(&cfg.s3)
                .create_buckets()
                .await?;
            println!("buckets ready on {}", cfg.s3.endpoint_url);
        }
        AdminCmd::Mesh { port } => {
            let (_, seed) = cfg
                .cluster_seed()
                .context("no coordinator node with a cluster_port in the config")?;
            let cookie = cfg
                .cluster
                .cookie
                .as_deref()
                .context("cluster.cookie (or TICKMESH_COOKIE) is needed to join the mesh")?;
            let port = if port == 0 {
                30_000 + (std::process::id() % 20_000) as u16
            } else {
                port
            };
            let name = format!("admin-{}", std::process::id());
            let tls = cluster::mesh_tls(cfg)?;
            let server = cluster::start_server(&name, cookie, "127.0.0.1", port, tls.as_ref())
                .await?
                .server;
            if tls.is_some() {
                for (_, addr) in cluster::peers(cfg, &name, true) {
                    cluster::connect(&server, &addr, tls.as_ref()).await?;
                }
            } else {
                cluster::connect(&server, &seed, None).await?;
            }
            let nodes = cluster::describe_remote_nodes(Duration::from_secs(10)).await?;
            if nodes.is_empty() {
                // The seed accepts the TCP connection and then refuses the
                // handshake: a wrong cookie looks like an empty mesh.
                return Err(anyhow!(
                    "no node of the mesh answered through the seed at {seed} within 10 s: is the cookie right (cluster.cookie / TICKMESH_COOKIE)?"
                ));
            }
            for n in &nodes {
                println!(
                    "{:<14} pid {:<7} roles {:<28} coordinator {:<21} http {}",
                    n.node,
                    n.pid,
                    n.roles.join(","),
                    n.coordinator.as_deref().unwrap_or("-"),
                    n.http.as_deref().unwrap_or("-")
                );
            }
            println!("{} nodes", nodes.len());
        }
    }
    Ok(())
}
