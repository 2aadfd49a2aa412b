//! `tickmesh`: one binary, every role.
//!
//! ```text
//! tickmesh demo                                  the whole pipeline in one process (embedded)
//! tickmesh run --node NAME [--config FILE]       start one node's roles from cluster.toml
//! tickmesh config check [FILE]                   validate a cluster.toml
//! tickmesh produce synthetic|files|alpaca|fred|company  publish a source to its topic
//! tickmesh aggregate --tickers .. --interval ..  load aggregated_data, publish start_model
//! tickmesh train --ticker AAPL --interval 1d     train one model from CSV files or the database
//! tickmesh evaluate --checkpoint DIR             re-score a saved model on a date range
//! tickmesh doctor                                libtorch, CUDA and cuDNN as this binary sees them
//! tickmesh dlq list|replay <topic>            dead letters, re-injected after a fix
//! tickmesh admin nodes|jobs|models|train|retrain|promote|rollback|drain|cordon
//!                                                the Admin API (bearer token)
//! tickmesh admin mesh|create-topics|create-buckets  operator chores
//! ```

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Result;
use chrono::NaiveDate;
use clap::{Parser, Subcommand};
use tickmesh::admin_cli::{self, AdminCmd};
use tickmesh::dlq_cli::{self, DlqCmd};
use tickmesh::produce_cli::{self, ProduceCmd};
use tickmesh::train_cli::{self, Source, UsageError};
use tickmesh::{demo, roles};
use tickmesh_core::config::{Backend, ClusterConfig};
use tickmesh_core::types::Interval;
use tickmesh_io::Adapters;
use tracing_subscriber::EnvFilter;

/// mimalloc instead of glibc's malloc (see BENCHMARKS.md, ingest).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tickmesh",
    version,
    about = "An actor cluster for stock-market machine learning"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the whole pipeline in one process on the embedded defaults and print forecasts.
    Demo {
        /// Working directory (cleared first): spool, objects, SQLite, chart.
        #[arg(long, default_value = "data/demo")]
        workdir: PathBuf,
        /// The daily bars sample.
        #[arg(long, default_value = "data/sample/stocks_daily.csv")]
        sample: PathBuf,
        /// HTTP listen address of the forecast API (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        http: String,
        #[arg(long, default_value_t = 30)]
        epochs: usize,
        #[arg(long, default_value_t = 10)]
        n_steps: usize,
        /// Keep serving forecasts after the demo until ctrl-c.
        #[arg(long)]
        serve: bool,
    },
    /// Start the roles of one node of cluster.toml.
    Run {
        #[arg(long)]
        node: String,
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
    },
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Publish bars to h_alpaca.
    Produce {
        #[arg(long, default_value = "cluster.toml", global = true)]
        config: PathBuf,
        #[command(subcommand)]
        cmd: ProduceCmd,
    },
    /// Aggregate tickers into aggregated_data and publish start_model.
    Aggregate {
        #[arg(long, value_delimiter = ',', required = true)]
        tickers: Vec<String>,
        #[arg(long, default_value = "1d")]
        interval: Interval,
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
        /// Tickers at once (default: twice the machine's cores, at most the PostgreSQL pool less 2).
        #[arg(long)]
        parallel: Option<u32>,
    },
    /// Train one model from `{data-dir}/{TICKER}_{interval}_*.csv` (or, with
    /// --from-db, from aggregated_data) and write its checkpoint, loss.png and test.png.
    Train {
        #[arg(long)]
        ticker: String,
        #[arg(long, default_value = "1d")]
        interval: Interval,
        #[arg(long)]
        epochs: Option<usize>,
        /// lstm_attention (default), gru or cnn_lstm.
        #[arg(long)]
        model: Option<String>,
        /// Feature columns, close first is customary (default: the config's).
        #[arg(long, value_delimiter = ',')]
        features: Option<Vec<String>>,
        #[command(flatten)]
        data: DataArgs,
        /// Checkpoint directory (default: data/models/{TICKER}_{interval}_{model}).
        #[arg(long)]
        out: Option<PathBuf>,
        /// cpu, cuda or auto (default: the config's).
        #[arg(long)]
        device: Option<String>,
        /// Print the metrics as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Re-score a saved checkpoint on the windows whose predicted bar falls in [from, to].
    Evaluate {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        from: Option<NaiveDate>,
        #[arg(long)]
        to: Option<NaiveDate>,
        #[command(flatten)]
        data: DataArgs,
        #[arg(long)]
        json: bool,
    },
    /// Placement of N jobs over simulated trainer nodes and failover after kills (scripts/bench/control_plane.sh).
    #[command(hide = true)]
    BenchControlPlane {
        #[arg(long, default_value_t = 1000)]
        jobs: usize,
        #[arg(long, default_value_t = 10)]
        nodes: usize,
        #[arg(long, default_value_t = 20)]
        kills: usize,
        #[arg(long, default_value_t = 1)]
        heartbeat_secs: u64,
        #[arg(long, default_value_t = 3)]
        lease_secs: u64,
        /// coordinator.retry_backoff_ms (a re-owned job waits it too).
        #[arg(long, default_value_t = 0)]
        retry_backoff_ms: u64,
        /// The job table in the PostgreSQL of --config instead of a fresh SQLite file.
        #[arg(long)]
        postgres_config: Option<PathBuf>,
    },
    /// The aggregation's compute on a local store (scripts/bench/aggregate.sh runs it beside Polars).
    #[command(hide = true)]
    BenchAggregate {
        /// A store directory (embedded layout: stock-data/, macro-data/, company-fundamentals/).
        #[arg(long, conflicts_with = "config")]
        store: Option<PathBuf>,
        /// Or the S3 store of a cluster.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Only write the input, synthetic bars FROM..TO (and the sample's macro series and fundamentals).
        #[arg(long)]
        generate: Option<String>,
        #[arg(long, value_delimiter = ',', required = true)]
        tickers: Vec<String>,
        #[arg(long, default_value = "1m")]
        interval: Interval,
        /// Macro series joined, SERIES=LAG_DAYS.
        #[arg(long = "macro", value_delimiter = ',')]
        macro_lags: Vec<String>,
        /// Tickers at once (default: the machine's cores).
        #[arg(long)]
        parallel: Option<usize>,
        /// Write each ticker's rows to {out}/{ticker}.parquet.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Ingest throughput, Kafka → Parquet, of records already on the topics (scripts/bench/ingest.sh).
    #[command(hide = true)]
    BenchIngest {
        #[arg(long)]
        config: PathBuf,
        /// Stop once this many records are written.
        #[arg(long)]
        records: u64,
        #[arg(long, default_value_t = 1800)]
        timeout_secs: u64,
    },
    /// Training throughput of each model kind (scripts/bench/train.sh runs it beside PyTorch).
    #[command(hide = true)]
    BenchTrain {
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "lstm_attention,gru,cnn_lstm"
        )]
        kinds: Vec<String>,
        /// Trading days of synthetic 1-minute bars.
        #[arg(long, default_value_t = 20)]
        days: i64,
        #[arg(long, default_value_t = 3)]
        epochs: usize,
        #[arg(long)]
        threads: Option<i32>,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Write the training and validation windows here (safetensors) for the peer.
        #[arg(long)]
        windows_out: Option<PathBuf>,
    },
    /// Forward-pass and forecast time of each model kind, native and libtorch (scripts/bench/serve.sh).
    #[command(hide = true)]
    BenchForecast {
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "lstm_attention,gru,cnn_lstm"
        )]
        kinds: Vec<String>,
        /// Steps of the timed forecast.
        #[arg(long, default_value_t = 100)]
        steps: usize,
    },
    /// Many tickers trained fused and one model at a time (scripts/bench/fused.sh runs it beside PyTorch).
    #[command(hide = true)]
    BenchFused {
        #[arg(long, default_value = "lstm_attention")]
        kind: String,
        #[arg(long, default_value_t = 30)]
        tickers: usize,
        /// Calendar days of synthetic bars per ticker.
        #[arg(long, default_value_t = 182)]
        days: i64,
        #[arg(long, default_value = "5m")]
        interval: Interval,
        #[arg(long, default_value_t = 2)]
        epochs: usize,
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        /// Members per fused group (0: every ticker in one group).
        #[arg(long, default_value_t = 0)]
        group: usize,
        #[arg(long)]
        threads: Option<i32>,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// fused, solo (one model at a time), or both.
        #[arg(long, value_delimiter = ',', default_value = "fused,solo")]
        ways: Vec<String>,
        /// Write every ticker's training and validation windows here (safetensors) for the peer.
        #[arg(long)]
        windows_out: Option<PathBuf>,
    },
    /// Print the libtorch version, whether CUDA is available and loaded, the device count and cuDNN.
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// Dead letters: list them, or replay them after a fix.
    Dlq {
        #[arg(long, default_value = "cluster.toml", global = true)]
        config: PathBuf,
        #[command(subcommand)]
        cmd: DlqCmd,
    },
    /// Operator commands.
    Admin {
        #[arg(long, default_value = "cluster.toml", global = true)]
        config: PathBuf,
        #[command(subcommand)]
        cmd: AdminCmd,
    },
}

/// Where `train` and `evaluate` read bars from.
#[derive(clap::Args)]
struct DataArgs {
    /// Directory of `{TICKER}_{interval}_*.csv` files.
    #[arg(long, default_value = "data/raw")]
    data_dir: PathBuf,
    /// Read aggregated_data from the database of --config instead of CSV files.
    #[arg(long)]
    from_db: bool,
    /// Hyperparameters ([train]) and, with --from-db, the database.
    #[arg(long)]
    config: Option<PathBuf>,
}

impl DataArgs {
    /// The config (the file's, or the defaults) and the source it names.
    fn resolve(self) -> Result<(ClusterConfig, Source)> {
        let cfg = train_cli::load_config(self.config.as_deref())?;
        let source = if self.from_db {
            Source::Db(Box::new(cfg.clone()))
        } else {
            Source::Csv(self.data_dir)
        };
        Ok((cfg, source))
    }
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate a cluster.toml (with environment overrides applied).
    Check {
        #[arg(default_value = "cluster.toml")]
        file: PathBuf,
    },
}

fn env() -> HashMap<String, String> {
    std::env::vars().collect()
}

fn load(path: &std::path::Path) -> Result<ClusterConfig> {
    Ok(ClusterConfig::load(path, &env())?)
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let default_level = match cli.cmd {
        Cmd::Demo { .. } => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run(cli).await {
        if let Some(u) = e.downcast_ref::<UsageError>() {
            eprintln!("error: {u}");
            std::process::exit(2);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Demo {
            workdir,
            sample,
            http,
            epochs,
            n_steps,
            serve,
        } => {
            demo::run(demo::DemoOptions {
                workdir,
                sample,
                http,
                epochs,
                n_steps,
                serve,
            })
            .await?;
        }
        Cmd::Train {
            ticker,
            interval,
            epochs,
            model,
            features,
            data,
            out,
            device,
            json,
        } => {
            let (cfg, source) = data.resolve()?;
            let mut train = cfg.train.clone();
            if let Some(d) = device {
                train.device = d;
            }
            train_cli::apply_overrides(
                &mut train,
                &cfg.features,
                model.as_deref(),
                features.as_deref(),
                epochs,
            )?;
            let out = out.unwrap_or_else(|| train_cli::default_out(&ticker, interval, train.model));
            let t = train_cli::train(train_cli::TrainOptions {
                ticker,
                interval,
                source,
                out,
                train,
                indicators: cfg.features.clone(),
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            })
            .await?;
            let f = &t.fitted;
            if json {
                println!("{}", serde_json::to_string_pretty(&t.meta.metrics)?);
            } else {
                println!(
                    "{} {} {}: {} epochs run, best epoch {} (validation loss {:.5}, untrained {:.5}){}; {:.0} training samples/s on {}",
                    t.meta.ticker,
                    t.meta.interval,
                    t.meta.kind,
                    f.epochs_run,
                    f.best_epoch,
                    f.best_val_loss,
                    f.initial_val_loss,
                    if f.stopped_early { ", stopped early" } else { "" },
                    f.samples_per_sec,
                    t.meta.device
                );
                println!(
                    "test split: {} windows, {} .. {}",
                    t.meta.splits.test,
                    t.meta.splits.test_from.date_naive(),
                    t.meta.splits.test_to.date_naive()
                );
                print!("{}", t.meta.metrics.table());
                println!(
                    "checkpoint {}  (model.safetensors, meta.json, CHECKSUM)",
                    t.dir.display()
                );
                println!(
                    "plots      {}  {}",
                    t.dir.join("loss.png").display(),
                    t.dir.join("test.png").display()
                );
            }
        }
        Cmd::Evaluate {
            checkpoint,
            from,
            to,
            data,
            json,
        } => {
            let (_, source) = data.resolve()?;
            let (meta, report, first, last) = train_cli::evaluate(train_cli::EvaluateOptions {
                checkpoint,
                source,
                from,
                to,
            })
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "{} {} {} v{} (trained {}), predicted bars {} .. {}:",
                    meta.ticker,
                    meta.interval,
                    meta.kind,
                    meta.version,
                    meta.trained_at.date_naive(),
                    first.date_naive(),
                    last.date_naive()
                );
                print!("{}", report.table());
            }
        }
        Cmd::BenchControlPlane {
            jobs,
            nodes,
            kills,
            heartbeat_secs,
            lease_secs,
            retry_backoff_ms,
            postgres_config,
        } => {
            if nodes < 2 || jobs == 0 {
                return Err(
                    UsageError("--nodes must be at least 2 and --jobs at least 1".into()).into(),
                );
            }
            let db = match postgres_config {
                Some(p) => Some(tickmesh_io::db::Db::connect_postgres(&load(&p)?.postgres).await?),
                None => None,
            };
            let out = tickmesh::bench_cp::run(tickmesh::bench_cp::Options {
                jobs,
                nodes,
                kills,
                heartbeat_secs,
                lease_secs,
                retry_backoff_ms,
                db,
            })
            .await?;
            for line in out {
                println!("{line}");
            }
        }
        Cmd::BenchAggregate {
            store,
            config,
            generate,
            tickers,
            interval,
            macro_lags,
            parallel,
            out,
        } => {
            let mut joins = tickmesh_core::config::JoinConfig::default();
            for m in &macro_lags {
                let (s, lag) = m
                    .split_once('=')
                    .and_then(|(s, l)| Some((s, l.parse::<u32>().ok()?)))
                    .ok_or_else(|| UsageError(format!("--macro `{m}`: expected SERIES=DAYS")))?;
                joins.macro_lags.insert(s.to_string(), lag);
            }
            joins
                .check()
                .map_err(|(k, m)| UsageError(format!("--macro: {k}: {m}")))?;
            let parallel = parallel
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let store: tickmesh_io::store::SharedStore = match (store, config) {
                (Some(dir), None) => {
                    std::sync::Arc::new(tickmesh_io::store::LocalStore::open(dir)?)
                }
                (None, Some(config)) => Adapters::connect(&load(&config)?).await?.store,
                _ => return Err(UsageError("give --store DIR or --config FILE".into()).into()),
            };
            if let Some(range) = generate {
                let (from, to) = range
                    .split_once("..")
                    .and_then(|(f, t)| Some((f.parse().ok()?, t.parse().ok()?)))
                    .ok_or_else(|| {
                        UsageError(format!(
                            "--generate `{range}`: expected YYYY-MM-DD..YYYY-MM-DD"
                        ))
                    })?;
                let sample = std::path::Path::new("data/sample");
                let n = tickmesh::bench_agg::generate(&store, &tickers, from, to, sample).await?;
                println!("{{\"generated_bars\":{n}}}");
                return Ok(());
            }
            let out = tickmesh::bench_agg::run(tickmesh::bench_agg::Options {
                store,
                tickers,
                interval,
                joins,
                parallel,
                out,
            })
            .await?;
            println!("{out}");
        }
        Cmd::BenchIngest {
            config,
            records,
            timeout_secs,
        } => {
            let cfg = load(&config)?;
            let out = tickmesh::bench_ingest::run(
                &cfg,
                records,
                std::time::Duration::from_secs(timeout_secs),
            )
            .await?;
            println!("{out}");
        }
        Cmd::BenchTrain {
            kinds,
            days,
            epochs,
            threads,
            device,
            windows_out,
        } => {
            let kinds = kinds
                .iter()
                .map(|k| k.parse())
                .collect::<Result<Vec<tickmesh_core::config::ModelKind>, _>>()?;
            tokio::task::spawn_blocking(move || {
                tickmesh::bench::run(
                    &kinds,
                    days,
                    epochs,
                    threads,
                    &device,
                    windows_out.as_deref(),
                )
            })
            .await??;
        }
        Cmd::BenchForecast { kinds, steps } => {
            let kinds = kinds
                .iter()
                .map(|k| k.parse())
                .collect::<Result<Vec<tickmesh_core::config::ModelKind>, _>>()?;
            tokio::task::spawn_blocking(move || tickmesh::bench::forecast(&kinds, steps)).await??;
        }
        Cmd::BenchFused {
            kind,
            tickers,
            days,
            interval,
            epochs,
            batch_size,
            group,
            threads,
            device,
            ways,
            windows_out,
        } => {
            let kind = kind.parse()?;
            tokio::task::spawn_blocking(move || {
                tickmesh::bench_fused::run(&tickmesh::bench_fused::FusedBench {
                    kind,
                    tickers,
                    days,
                    interval,
                    epochs,
                    batch_size,
                    group,
                    threads,
                    device: &device,
                    ways: &ways,
                    windows_out: windows_out.as_deref(),
                })
            })
            .await??;
        }
        Cmd::Doctor { json } => {
            let d = tokio::task::spawn_blocking(train_cli::doctor).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                println!("{d}");
            }
        }
        Cmd::Config {
            cmd: ConfigCmd::Check { file },
        } => {
            let cfg = load(&file)?;
            println!(
                "{}: ok ({} backend, {} nodes: {})",
                file.display(),
                match cfg.cluster.backend {
                    Backend::Embedded => "embedded",
                    Backend::Distributed => "distributed",
                },
                cfg.nodes.len(),
                cfg.nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Cmd::Run { node, config } => {
            let cfg = load(&config)?;
            let nc = cfg.node(&node)?;
            let roles = nc.roles.clone();
            if roles.contains(&tickmesh_core::config::Role::Coordinator) {
                // Before any connection: a distributed coordinator without a token does not start.
                roles::admin_token(&cfg)?;
            }
            let adapters = Adapters::connect(&cfg).await?;
            let mut n = roles::start(&cfg, &node, &roles, &adapters).await?;
            tracing::info!(node = %node, ?roles, "node started");
            let r = n.wait().await;
            n.stop().await;
            r?;
        }
        Cmd::Produce { config, cmd } => {
            let cfg = load(&config)?;
            produce_cli::run(&cfg, cmd).await?;
        }
        Cmd::Aggregate {
            tickers,
            interval,
            config,
            parallel,
        } => {
            let cfg = load(&config)?;
            let a = Adapters::connect(&cfg).await?;
            if parallel == Some(0) {
                return Err(UsageError("--parallel must be at least 1".into()).into());
            }
            let mut args = tickmesh_aggregate::aggregator::AggregatorArgs::of(
                &cfg,
                None,
                a.store.clone(),
                a.db.clone(),
                a.publisher.clone(),
            );
            if let Some(p) = parallel {
                args.parallel = p as usize;
            }
            let report = tickmesh_aggregate::aggregator::run(&args, &tickers, interval).await?;
            for (t, rows) in report.rows {
                println!("{t} {interval}: {rows} rows loaded");
            }
        }
        Cmd::Dlq { config, cmd } => {
            let cfg = load(&config)?;
            dlq_cli::run(&cfg, cmd).await?;
        }
        Cmd::Admin { config, cmd } => {
            let cfg = load(&config)?;
            admin_cli::run(&cfg, cmd).await?;
        }
    }
    Ok(())
}
