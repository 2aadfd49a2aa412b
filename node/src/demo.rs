//! `tickmesh demo`: the whole pipeline in one process.
//!
//! Produce (real daily bars from the committed sample + synthetic 1-minute
//! bars + one malformed message) → ingest (Parquet per ticker-week) →
//! aggregate (indicators into the database, `start_model`) → coordinator
//! (gRPC on 127.0.0.1) → trainers → checkpoints → predictors → HTTP
//! forecasts, printed, and a PNG chart of forecast vs actual.
//!
//! [`pipeline`] is the part after start-up; the end-to-end tests call it on
//! both the embedded and the distributed adapters.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use chrono::NaiveDate;
use ractor::call_t;
use serde_json::Value;
use tickmesh_aggregate::aggregator::AggregatorMsg;
use tickmesh_core::config::{Backend, ClusterConfig, Role};
use tickmesh_core::types::{topics, Interval};
use tickmesh_ingest::producer;
use tickmesh_io::store::buckets;
use tickmesh_io::Adapters;
use tracing::info;

use crate::chart::{self, Panel};
use crate::roles::{self, Node};

/// What to feed the pipeline.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// Daily bars CSV (`data/sample/stocks_daily.csv` layout) and the tickers to take from it.
    pub daily_csv: Option<PathBuf>,
    pub daily_tickers: Vec<String>,
    /// Keep only daily bars on or after this date (keeps the demo short).
    pub daily_from: Option<NaiveDate>,
    /// Synthetic 1-minute tickers, their date range and the interval to train them on.
    pub synthetic_tickers: Vec<String>,
    pub synthetic_from: NaiveDate,
    pub synthetic_to: NaiveDate,
    pub synthetic_interval: Interval,
    /// Macro series CSV (`data/sample/macrodata.csv`) → `h_macrodata`.
    pub macro_csv: Option<PathBuf>,
    /// Fundamentals file (`data/sample/fundamentals.csv`) → `h_company`.
    pub fundamentals: Option<PathBuf>,
    /// Also publish one malformed message (it must be dead-lettered, not lost).
    pub malformed: bool,
    pub n_steps: usize,
    /// The model kind the trainers are configured with (for the progress line).
    pub model: tickmesh_core::config::ModelKind,
    /// Give up waiting for a stage after this long.
    pub timeout: Duration,
}

/// What became of one (ticker, interval): the forecast the HTTP API gave
/// for its champion, and the versions the promotion gate rejected.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub ticker: String,
    pub interval: Interval,
    /// `None` when no version was promoted (none beat the naive forecast).
    pub response: Option<Value>,
    /// (version, the gate's reason).
    pub rejected: Vec<(i64, String)>,
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut cond: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let start = Instant::now();
    let mut last_report = Instant::now();
    loop {
        if cond().await? {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("timed out after {:?} waiting for {what}", timeout);
        }
        if last_report.elapsed() > Duration::from_secs(15) {
            info!(
                waiting_for = what,
                secs = start.elapsed().as_secs(),
                "still waiting"
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The macro series of `data/sample/macrodata.csv` the demo joins, with
/// their release lags in days (as in cluster.toml's `[joins]`).
pub const DEMO_MACRO_LAGS: [(&str, u32); 4] = [
    ("CPI", 110),
    ("REALGDP", 120),
    ("TBILRATE", 92),
    ("UNEMP", 100),
];

/// Runs produce → ingest → aggregate → train → serve on a started node that
/// has every role, and returns the forecasts the HTTP API gives.
pub async fn pipeline(node: &Node, adapters: &Adapters, inputs: &Inputs) -> Result<Vec<Outcome>> {
    let publisher = adapters.publisher.as_ref();
    let mut published = 0usize;
    let mut jobs: Vec<(Vec<String>, Interval)> = Vec::new();

    if let Some(csv) = &inputs.daily_csv {
        let data = producer::read_daily_csv(csv, &inputs.daily_tickers)?;
        for t in &inputs.daily_tickers {
            let mut bars = data
                .get(t)
                .cloned()
                .ok_or_else(|| anyhow!("{t} is not in {}", csv.display()))?;
            if let Some(from) = inputs.daily_from {
                bars.retain(|b| tickmesh_core::calendar::ny_date(b.t) >= from);
            }
            let n = producer::publish_bars(publisher, t, &bars).await?;
            println!(
                "produced  {t:<6} {:>6} daily bars in {n} weekly messages",
                bars.len()
            );
            published += n;
        }
        jobs.push((inputs.daily_tickers.clone(), Interval::D1));
    }
    if !inputs.synthetic_tickers.is_empty() {
        let n = producer::publish_synthetic(
            publisher,
            &inputs.synthetic_tickers,
            inputs.synthetic_from,
            inputs.synthetic_to,
        )
        .await?;
        println!(
            "produced  {} synthetic 1-minute tickers ({} to {}) in {n} weekly messages",
            inputs.synthetic_tickers.join(", "),
            inputs.synthetic_from,
            inputs.synthetic_to
        );
        published += n;
        jobs.push((inputs.synthetic_tickers.clone(), inputs.synthetic_interval));
    }
    if let Some(path) = &inputs.macro_csv {
        let msgs = producer::read_macro_csv(path)?;
        let (series, mut n) = (msgs.len(), 0);
        for m in msgs {
            n += tickmesh_ingest::fred::publish_macro(publisher, &m.series, m.observations).await?;
        }
        println!(
            "produced  {series} macro series from {} in {n} messages",
            path.display()
        );
        published += n;
    }
    if let Some(path) = &inputs.fundamentals {
        let rows = producer::read_fundamentals(path)?;
        let n = producer::publish_fundamentals(publisher, &rows).await?;
        println!(
            "produced  {n} symbol-years of fundamentals from {}",
            path.display()
        );
        published += n;
    }
    if inputs.malformed {
        publisher
            .publish(
                topics::BARS,
                "BAD",
                br#"{"ticker":"AAPL","bars":[{"t":"not a time"}]}"#,
                &[],
            )
            .await?;
        published += 1;
    }

    let m = node.ingest_metrics.clone();
    wait_for("ingestion", inputs.timeout, || {
        let m = m.clone();
        async move { Ok(m.messages() + m.malformed() >= published as u64) }
    })
    .await?;
    println!(
        "ingested  {} messages, {} bars, {} Parquet objects written, {} malformed (dead-lettered: {})",
        m.messages(),
        m.bars(),
        m.objects_written(),
        m.malformed(),
        m.dead_lettered()
    );
    let mut stored = Vec::new();
    for (bucket, what) in [
        (buckets::STOCK_DATA, "ticker-weeks of bars"),
        (buckets::MACRO_DATA, "macro series-years"),
        (buckets::COMPANY, "fundamentals symbol-years"),
    ] {
        let n = adapters.store.list(bucket, "").await?.len();
        stored.push(format!("{n} {what}"));
    }
    println!("stored    {}", stored.join(", "));

    let agg = node
        .aggregator
        .get()
        .ok_or_else(|| anyhow!("the node has no aggregate role"))?;
    for (tickers, interval) in &jobs {
        let (tickers, interval) = (tickers.clone(), *interval);
        let report = call_t!(
            agg,
            |reply| AggregatorMsg::Run {
                tickers,
                interval,
                reply: Some(reply)
            },
            600_000
        )
        .map_err(|e| anyhow!("aggregator: {e}"))?
        .map_err(|e| anyhow!("aggregation failed: {e}"))?;
        for (t, rows) in &report.rows {
            println!("aggregated {t:<6} {interval:>3}: {rows} rows into aggregated_data; start_model published");
        }
    }

    let http = node
        .bound
        .http
        .ok_or_else(|| anyhow!("the node has no serve role"))?;
    let client = reqwest::Client::new();
    let wanted: Vec<(String, Interval)> = jobs
        .iter()
        .flat_map(|(ts, i)| ts.iter().map(move |t| (t.clone(), *i)))
        .collect();
    let models_url = format!("http://{http}/ml/models");
    println!("training  {} models ({}) ...", wanted.len(), inputs.model);
    // Done when every (ticker, interval) has a registered version, and the
    // predictor serves the champion of each that has one (a version the
    // promotion gate rejected is registered but never served).
    wait_for(
        "every model to be trained, and each champion served",
        inputs.timeout,
        || {
            let (client, url, wanted, db) = (
                client.clone(),
                models_url.clone(),
                wanted.clone(),
                adapters.db.clone(),
            );
            async move {
                let v: Value = client.get(&url).send().await?.json().await?;
                let served = v["models"].as_array().cloned().unwrap_or_default();
                for (t, i) in &wanted {
                    let versions = db.models(Some(t), Some(*i), true).await?;
                    if versions.is_empty() {
                        return Ok(false);
                    }
                    if let Some(c) = versions.iter().find(|m| m.status == "champion") {
                        let serving = served.iter().any(|m| {
                            m["ticker"] == t.as_str()
                                && m["interval"] == i.as_str()
                                && m["version"] == c.version
                        });
                        if !serving {
                            return Ok(false);
                        }
                    }
                }
                Ok(true)
            }
        },
    )
    .await?;

    let mut out = Vec::new();
    for (ticker, interval) in wanted {
        let versions = adapters
            .db
            .models(Some(&ticker), Some(interval), true)
            .await?;
        let rejected = versions
            .iter()
            .filter(|m| m.status == "rejected")
            .map(|m| {
                let reason = serde_json::from_str::<Value>(&m.metrics)
                    .ok()
                    .and_then(|v| v["gate"]["reason"].as_str().map(str::to_string))
                    .unwrap_or_default();
                (m.version, reason)
            })
            .collect();
        let response = if versions.iter().any(|m| m.status == "champion") {
            let url = format!(
                "http://{http}/ml/forecast?ticker={ticker}&interval={interval}&n_steps={}",
                inputs.n_steps
            );
            let resp = client.get(&url).send().await?;
            let status = resp.status();
            let body: Value = resp.json().await?;
            if !status.is_success() {
                bail!("GET {url}: {status} {body}");
            }
            Some(body)
        } else {
            None
        };
        out.push(Outcome {
            ticker,
            interval,
            response,
            rejected,
        });
    }
    Ok(out)
}

/// Prints the forecasts as a table.
pub fn print_forecasts(outcomes: &[Outcome]) {
    println!();
    println!(
        "ticker interval version  test RMSE (naive)   dir.acc  last close  forecast (next steps)"
    );
    for o in outcomes {
        for (v, why) in &o.rejected {
            println!(
                "{:<6} {:<8} v{:<6} rejected: {why}",
                o.ticker,
                o.interval.as_str(),
                v
            );
        }
        let Some(r) = &o.response else {
            println!(
                "{:<6} {:<8} no forecast: no version beat the naive forecast",
                o.ticker,
                o.interval.as_str()
            );
            continue;
        };
        let m = &r["model"]["metrics"];
        let f: Vec<String> = r["forecasts"]
            .as_array()
            .map(|a| {
                a.iter()
                    .take(5)
                    .map(|p| format!("{:.2}", p["close"].as_f64().unwrap_or(f64::NAN)))
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{:<6} {:<8} v{:<6} {:>8.3} ({:>8.3})  {:>6.1}%  {:>10.2}  {} ...",
            o.ticker,
            o.interval.as_str(),
            r["model"]["version"],
            m["model"]["rmse"].as_f64().unwrap_or(f64::NAN),
            m["naive"]["rmse"].as_f64().unwrap_or(f64::NAN),
            100.0
                * m["model"]["directional_accuracy"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
            r["last_close"].as_f64().unwrap_or(f64::NAN),
            f.join("  ")
        );
    }
    println!();
}

/// Builds the chart panels from the checkpoints' test points.
pub async fn chart_panels(
    adapters: &Adapters,
    outcomes: &[Outcome],
    last: usize,
) -> Result<Vec<Panel>> {
    let mut panels = Vec::new();
    for o in outcomes {
        let Some(response) = &o.response else {
            continue;
        };
        let version = response["model"]["version"]
            .as_i64()
            .ok_or_else(|| anyhow!("no version"))?;
        let val = tickmesh_model::checkpoint::read_test_points(
            adapters.store.as_ref(),
            &o.ticker,
            o.interval,
            version,
        )
        .await?;
        let start = val.len().saturating_sub(last);
        let forecast = response["forecasts"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| Some((p["ts"].as_str()?.parse().ok()?, p["close"].as_f64()?)))
                    .collect()
            })
            .unwrap_or_default();
        panels.push(Panel {
            title: format!(
                "{} {} v{version}: actual, one-step prediction, forecast",
                o.ticker, o.interval
            ),
            validation: val[start..]
                .iter()
                .map(|p| (p.ts, p.actual, p.predicted))
                .collect(),
            forecast,
        });
    }
    Ok(panels)
}

/// Options of `tickmesh demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub workdir: PathBuf,
    pub sample: PathBuf,
    pub http: String,
    pub epochs: usize,
    pub n_steps: usize,
    pub serve: bool,
}

/// Runs the demo; returns the chart's path.
pub async fn run(opts: DemoOptions) -> Result<PathBuf> {
    let started = Instant::now();
    if opts.workdir.exists() {
        std::fs::remove_dir_all(&opts.workdir)
            .with_context(|| format!("clear {}", opts.workdir.display()))?;
    }
    std::fs::create_dir_all(&opts.workdir)?;
    let mut cfg = ClusterConfig::parse("", "demo", &std::collections::HashMap::new())?;
    cfg.cluster.backend = Backend::Embedded;
    cfg.embedded.data_dir = opts.workdir.clone();
    cfg.coordinator.listen = "127.0.0.1:0".into();
    cfg.serve.http_listen = opts.http.clone();
    cfg.train.epochs = opts.epochs;
    // The demo runs each aggregation itself (and shows what it loaded).
    cfg.aggregate.on_ingest = false;
    // statsmodels' quarterly macro series, dated by the quarter's first day:
    // each lag is the quarter plus the agency's release delay (docs/aggregation.md).
    cfg.joins.macro_lags = DEMO_MACRO_LAGS
        .iter()
        .map(|&(s, lag)| (s.to_string(), lag))
        .collect();
    println!("tickmesh demo: every role in one process on the embedded defaults");
    println!(
        "  spool {}, objects {}, database {}",
        cfg.embedded.raw_dir().display(),
        cfg.embedded.store_dir().display(),
        cfg.embedded.sqlite_path().display()
    );
    let adapters = Adapters::connect(&cfg).await?;
    let all = [
        Role::Coordinator,
        Role::Ingest,
        Role::Aggregate,
        Role::Train,
        Role::Serve,
    ];
    let node = roles::start(&cfg, "demo", &all, &adapters).await?;
    let http = node.bound.http.expect("serve role started");
    println!(
        "  coordinator gRPC on {}, forecast API on http://{http}",
        node.bound.coordinator.expect("coordinator started")
    );
    let inputs = Inputs {
        daily_csv: Some(opts.sample.clone()),
        macro_csv: Some(opts.sample.with_file_name("macrodata.csv")),
        fundamentals: Some(opts.sample.with_file_name("fundamentals.csv")),
        daily_tickers: vec!["AAPL".into(), "MSFT".into()],
        daily_from: Some(NaiveDate::from_ymd_opt(2008, 1, 1).expect("valid date")),
        synthetic_tickers: vec!["SYNA".into(), "SYNB".into()],
        synthetic_from: NaiveDate::from_ymd_opt(2024, 3, 4).expect("valid date"),
        synthetic_to: NaiveDate::from_ymd_opt(2024, 3, 29).expect("valid date"),
        synthetic_interval: Interval::M5,
        malformed: true,
        n_steps: opts.n_steps,
        model: cfg.train.model,
        timeout: Duration::from_secs(900),
    };
    let result = pipeline(&node, &adapters, &inputs).await;
    let outcomes = match result {
        Ok(o) => o,
        Err(e) => {
            node.stop().await;
            return Err(e);
        }
    };
    print_forecasts(&outcomes);
    let chart_path = opts.workdir.join("forecast.png");
    let panels = chart_panels(&adapters, &outcomes, 120).await?;
    if panels.is_empty() {
        println!("chart     none: no model beat the naive forecast, so none serves");
    } else {
        chart::draw(&chart_path, &panels)?;
        println!(
            "chart     {} (actual vs one-step prediction over the test split, then the forecast)",
            chart_path.display()
        );
    }
    if let Some(o) = outcomes.iter().find(|o| o.response.is_some()) {
        println!(
            "try       curl 'http://{http}/ml/forecast?ticker={}&interval={}&n_steps=10'",
            o.ticker, o.interval
        );
    }
    println!("          curl 'http://{http}/ml/models'   (what serves, and what the gate rejected: /ml/models/TICKER)");
    println!("done in {:.0} s", started.elapsed().as_secs_f64());
    if opts.serve {
        println!("serving until ctrl-c ...");
        let mut node = node;
        let r = node.wait().await;
        node.stop().await;
        r?;
    } else {
        node.stop().await;
    }
    Ok(chart_path)
}
