//! `tickmesh produce …`: publish a source's data to its topic.
//!
//! ```text
//! produce synthetic --tickers A,B --from D --to D   deterministic 1-minute bars → h_alpaca
//! produce files --dir DIR | --file F [--tickers ..] bar CSV files → h_alpaca
//! produce alpaca --from D --to D [--tickers ..]     Alpaca v2 1-minute bars → h_alpaca
//! produce fred [--series ..] [--from D] [--to D]    FRED observations → h_macrodata
//! produce macro --file F.csv                       macro series from a file → h_macrodata
//! produce company --file F.parquet|F.csv            fundamentals → h_company
//! produce replay --tickers A,B --from D --to D --speed 60x [--store DIR]
//!                                                   stored bars → live_bars, paced
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use chrono::{NaiveDate, TimeZone, Utc};
use clap::Subcommand;
use tickmesh_core::config::ClusterConfig;
use tickmesh_core::types::topics;
use tickmesh_ingest::{alpaca, fred, producer};
use tickmesh_io::Adapters;

#[derive(Subcommand, Debug)]
pub enum ProduceCmd {
    /// Deterministic synthetic 1-minute bars on NYSE trading days.
    Synthetic {
        #[arg(long, value_delimiter = ',', required = true)]
        tickers: Vec<String>,
        #[arg(long)]
        from: NaiveDate,
        #[arg(long)]
        to: NaiveDate,
    },
    /// Bars from CSV files (columns found by name; `Adj Close` adjusts
    /// prices and volume): every *.csv of --dir, or one --file.
    #[command(alias = "csv")]
    Files {
        #[arg(long, conflicts_with = "dir", required_unless_present = "dir")]
        file: Option<PathBuf>,
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Only these tickers (default: all in the files).
        #[arg(long, value_delimiter = ',')]
        tickers: Vec<String>,
    },
    /// 1-minute bars from Alpaca's market-data v2 API (API_KEY_ALPACA,
    /// API_SECRET_ALPACA), one message per ticker-week.
    Alpaca {
        /// Default: the active tickers of companies_info.
        #[arg(long, value_delimiter = ',')]
        tickers: Vec<String>,
        #[arg(long)]
        from: NaiveDate,
        /// Inclusive.
        #[arg(long)]
        to: NaiveDate,
        #[arg(long, default_value = "sip")]
        feed: String,
        #[arg(long, env = "TICKMESH_ALPACA_URL", default_value = alpaca::DEFAULT_BASE_URL)]
        base_url: String,
    },
    /// Observations of FRED series (API_KEY_FRED), one message per series.
    Fred {
        #[arg(long, value_delimiter = ',', default_values_t = fred::DEFAULT_SERIES.map(String::from))]
        series: Vec<String>,
        #[arg(long)]
        from: Option<NaiveDate>,
        #[arg(long)]
        to: Option<NaiveDate>,
        #[arg(long, env = "TICKMESH_FRED_URL", default_value = fred::DEFAULT_BASE_URL)]
        base_url: String,
    },
    /// Macro series from a CSV file (`series,date,value`, or a date or
    /// year+quarter column and one column per series), one message per series.
    Macro {
        #[arg(long)]
        file: PathBuf,
    },
    /// Stored bars replayed into live_bars as a live feed, in market-time
    /// order across tickers, at `--speed` (`60x`: a minute bar a second;
    /// `max`: as fast as the bus takes them). Closed-market gaps count as one
    /// bar interval.
    Replay {
        #[arg(long, value_delimiter = ',', required = true)]
        tickers: Vec<String>,
        /// First New York trading date (inclusive).
        #[arg(long)]
        from: NaiveDate,
        /// Last New York trading date (inclusive).
        #[arg(long)]
        to: NaiveDate,
        #[arg(long, default_value = "60x")]
        speed: tickmesh_ingest::producer::Speed,
        /// Read the bars from this object directory (the embedded layout:
        /// stock-data/…) instead of the config's object store.
        #[arg(long)]
        store: Option<PathBuf>,
    },
    /// Fundamentals from a Parquet or CSV file, one message per (symbol, calendarYear).
    Company {
        #[arg(long)]
        file: PathBuf,
    },
}

pub async fn run(cfg: &ClusterConfig, cmd: ProduceCmd) -> Result<()> {
    let adapters = Adapters::connect(cfg).await?;
    let publisher = adapters.publisher.clone();
    let started = Instant::now();
    let (n, topic) = match cmd {
        ProduceCmd::Synthetic { tickers, from, to } => (
            producer::publish_synthetic(publisher.as_ref(), &tickers, from, to).await?,
            topics::BARS,
        ),
        ProduceCmd::Files { file, dir, tickers } => {
            let data = match (&file, &dir) {
                (Some(f), _) => producer::read_daily_csv(f, &tickers)?,
                (None, Some(d)) => producer::read_bar_dir(d, &tickers)?,
                (None, None) => bail!("give --file or --dir"),
            };
            for t in &tickers {
                if !data.contains_key(t) {
                    bail!(
                        "{t} is not in {}",
                        file.as_ref()
                            .or(dir.as_ref())
                            .expect("one is set")
                            .display()
                    );
                }
            }
            let mut n = 0;
            for (t, bars) in &data {
                n += producer::publish_bars(publisher.as_ref(), t, bars).await?;
                tracing::info!(ticker = %t, bars = bars.len(), "bars published");
            }
            (n, topics::BARS)
        }
        ProduceCmd::Alpaca {
            tickers,
            from,
            to,
            feed,
            base_url,
        } => {
            let tickers = if tickers.is_empty() {
                adapters.db.active_companies().await?
            } else {
                tickers
            };
            let api = alpaca::AlpacaClient::from_env(&base_url, &feed)?;
            let start = Utc.from_utc_datetime(&from.and_hms_opt(0, 0, 0).expect("midnight"));
            let end = Utc.from_utc_datetime(
                &to.succ_opt()
                    .context("--to is the last date chrono knows")?
                    .and_hms_opt(0, 0, 0)
                    .expect("midnight"),
            );
            let mut last_log = Instant::now();
            let report =
                alpaca::produce_alpaca(&api, publisher.as_ref(), &tickers, start, end, |r| {
                    if last_log.elapsed().as_secs() >= 5 {
                        last_log = Instant::now();
                        tracing::info!(
                            pages = r.pages,
                            bars = r.bars,
                            messages = r.messages,
                            "alpaca: progress"
                        );
                    }
                })
                .await?;
            println!(
                "alpaca: {} bars of {} tickers in {} pages ({} retries)",
                report.bars,
                tickers.len(),
                report.pages,
                report.retries
            );
            (report.messages, topics::BARS)
        }
        ProduceCmd::Fred {
            series,
            from,
            to,
            base_url,
        } => {
            let api = fred::FredClient::from_env(&base_url)?;
            let report = fred::produce_fred(&api, publisher.as_ref(), &series, from, to).await?;
            for (s, n) in &report.series {
                println!("fred: {s}: {n} observations");
            }
            println!(
                "fred: {} missing values (\".\") skipped, {} retries",
                report.missing, report.retries
            );
            (report.messages, topics::MACRO)
        }
        ProduceCmd::Macro { file } => {
            let mut n = 0;
            for msg in producer::read_macro_csv(&file)? {
                n += fred::publish_macro(publisher.as_ref(), &msg.series, msg.observations).await?;
            }
            (n, topics::MACRO)
        }
        ProduceCmd::Replay {
            tickers,
            from,
            to,
            speed,
            store,
        } => {
            if from > to {
                bail!("--from {from} is after --to {to}");
            }
            let source: tickmesh_io::store::SharedStore = match store {
                Some(dir) => std::sync::Arc::new(
                    tickmesh_io::store::LocalStore::open(&dir)
                        .with_context(|| format!("open the object directory {}", dir.display()))?,
                ),
                None => adapters.store.clone(),
            };
            let mut bars = std::collections::BTreeMap::new();
            for t in &tickers {
                let mut b = tickmesh_aggregate::aggregator::read_ticker_bars(&source, t).await?;
                b.retain(|b| {
                    let d = tickmesh_core::calendar::ny_date(b.t);
                    d >= from && d <= to
                });
                if b.is_empty() {
                    bail!("{t} has no stored bars from {from} to {to}");
                }
                bars.insert(t.clone(), b);
            }
            let total: usize = bars.values().map(Vec::len).sum();
            println!(
                "replaying {total} bars of {} tickers into {} at {speed:?}",
                tickers.len(),
                cfg.topic(topics::LIVE_BARS)
            );
            let mut last_log = Instant::now();
            let report = producer::replay(publisher.as_ref(), &bars, speed, |r| {
                if last_log.elapsed().as_secs() >= 5 {
                    last_log = Instant::now();
                    println!(
                        "replay: {} of {total} bars, market time {}",
                        r.bars,
                        r.through.map(|t| t.to_rfc3339()).unwrap_or_default()
                    );
                }
            })
            .await?;
            (report.messages, topics::LIVE_BARS)
        }
        ProduceCmd::Company { file } => {
            let rows = producer::read_fundamentals(&file)?;
            (
                producer::publish_fundamentals(publisher.as_ref(), &rows).await?,
                topics::COMPANY,
            )
        }
    };
    println!(
        "published {n} messages to {} in {:.1} s",
        cfg.topic(topic),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
