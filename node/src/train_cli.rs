//! `tickmesh train`, `tickmesh evaluate` and `tickmesh doctor`: training as
//! the original ML module's CLI did it, on CSV files or on
//! `aggregated_data`, with the same code the pipeline's trainers run.
//!
//! Errors a user can fix (a missing file, too few rows for `seq_len`, an
//! unknown feature or model) are [`UsageError`]s: the binary prints them on
//! one line and exits with code 2.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use tickmesh_core::config::{ClusterConfig, FeatureConfig, ModelKind, TrainConfig};
use tickmesh_core::types::AggRow;
use tickmesh_core::types::{validate_ticker, Bar, Interval};
use tickmesh_io::Adapters;
use tickmesh_model::checkpoint::{self, Files, Meta};
use tickmesh_model::dataset::Dataset;
use tickmesh_model::fit::{self, Fitted};
use tickmesh_model::metrics::EvalReport;

use crate::chart;

/// A problem with what the user asked for; the binary exits with code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn usage(m: impl Into<String>) -> anyhow::Error {
    UsageError(m.into()).into()
}

/// Where training rows come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// `{dir}/{TICKER}_{interval}_*.csv`.
    Csv(PathBuf),
    /// `aggregated_data` in the configured database.
    Db(Box<ClusterConfig>),
}

/// The CSV files of a ticker-interval in `dir`, sorted.
pub fn csv_files(dir: &Path, ticker: &str, interval: Interval) -> Result<Vec<PathBuf>> {
    let prefix = format!("{ticker}_{interval}_");
    let entries = std::fs::read_dir(dir).map_err(|e| {
        usage(format!(
            "cannot read the data directory {}: {e}",
            dir.display()
        ))
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".csv"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(usage(format!(
            "no file {}/{prefix}*.csv: put the {ticker} {interval} bars there (a header row with a date or timestamp column and open, high, low, close, volume)",
            dir.display()
        )));
    }
    Ok(files)
}

/// A timestamp cell: RFC 3339, `YYYY-MM-DD HH:MM[:SS]` (UTC), or a date
/// (the bar is stamped at that day's New York session open).
fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for f in ["%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
            return Some(Utc.from_utc_datetime(&t));
        }
    }
    let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
    Some(
        tickmesh_core::calendar::session(d)
            .map(|(open, _)| open)
            .unwrap_or_else(|| Utc.from_utc_datetime(&d.and_hms_opt(14, 30, 0).expect("valid"))),
    )
}

/// Reads bars from CSV files (see [`csv_files`]); later files win on equal
/// timestamps. Every problem names the file and the line.
pub fn read_csv_bars(files: &[PathBuf]) -> Result<Vec<Bar>> {
    let mut bars: BTreeMap<DateTime<Utc>, Bar> = BTreeMap::new();
    for path in files {
        let p = path.display();
        let mut r = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .from_path(path)
            .map_err(|e| usage(format!("{p}: {e}")))?;
        let header: Vec<String> = r
            .headers()
            .map_err(|e| usage(format!("{p}: {e}")))?
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        let col = |names: &[&str]| header.iter().position(|h| names.contains(&h.as_str()));
        let time = col(&["date", "timestamp", "time", "datetime", "t"]).ok_or_else(|| {
            usage(format!(
                "{p}: the header has no date or timestamp column (date, timestamp, time, datetime)"
            ))
        })?;
        let mut fields = [0usize; 5];
        for (k, name) in ["open", "high", "low", "close", "volume"]
            .iter()
            .enumerate()
        {
            fields[k] = col(&[name])
                .ok_or_else(|| usage(format!("{p}: the header has no `{name}` column")))?;
        }
        for (i, rec) in r.records().enumerate() {
            let line = i + 2;
            let rec = rec.map_err(|e| usage(format!("{p}:{line}: {e}")))?;
            let cell = |j: usize| rec.get(j).unwrap_or("");
            let t = parse_time(cell(time)).ok_or_else(|| {
                usage(format!(
                    "{p}:{line}: `{}` is not a date or timestamp",
                    cell(time)
                ))
            })?;
            let mut v = [0f64; 5];
            for (k, &j) in fields.iter().enumerate() {
                v[k] = cell(j)
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or_else(|| {
                        usage(format!(
                            "{p}:{line}: `{}` is not a non-negative number",
                            cell(j)
                        ))
                    })?;
            }
            if v[..4].iter().any(|x| *x <= 0.0) || v[1] < v[2] {
                return Err(usage(format!(
                    "{p}:{line}: prices must be positive with high >= low"
                )));
            }
            bars.insert(
                t,
                Bar {
                    t,
                    o: v[0],
                    h: v[1],
                    l: v[2],
                    c: v[3],
                    v: v[4].round() as u64,
                    n: 0,
                    vw: v[3],
                },
            );
        }
    }
    Ok(bars.into_values().collect())
}

/// The rows of `features` (in that order) of a ticker-interval; from CSV
/// files, the indicators are computed with the periods of `indicators`.
pub async fn load_rows(
    source: &Source,
    ticker: &str,
    interval: Interval,
    indicators: &FeatureConfig,
    features: &[String],
) -> Result<Vec<AggRow>> {
    match source {
        Source::Csv(dir) => {
            let bars = read_csv_bars(&csv_files(dir, ticker, interval)?)?;
            let all = indicators.columns();
            let cols: Vec<usize> = features
                .iter()
                .map(|f| {
                    tickmesh_features::column_index(&all, f).ok_or_else(|| {
                        usage(format!("`{f}` is not a feature ({})", all.join(", ")))
                    })
                })
                .collect::<Result<_>>()?;
            Ok(tickmesh_features::feature_rows(indicators, &bars)
                .into_iter()
                .map(|r| AggRow {
                    ts: r.ts,
                    values: cols.iter().map(|&c| r.values[c]).collect(),
                })
                .collect())
        }
        Source::Db(cfg) => {
            let a = Adapters::connect(cfg).await?;
            let rows =
                a.db.read_aggregated(ticker, interval, features, None)
                    .await?;
            if rows.is_empty() {
                return Err(usage(format!(
                    "unknown ticker {ticker}: no aggregated_data rows for interval {interval}"
                )));
            }
            Ok(rows)
        }
    }
}

/// Options of `tickmesh train`.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub ticker: String,
    pub interval: Interval,
    pub source: Source,
    pub out: PathBuf,
    pub train: TrainConfig,
    /// The indicator periods (`[features]`).
    pub indicators: FeatureConfig,
    /// Show the progress bar (off in tests and when stderr is not a terminal).
    pub progress: bool,
}

/// What `tickmesh train` produced.
pub struct Trained {
    pub meta: Meta,
    pub fitted: Fitted,
    pub dir: PathBuf,
}

/// Parses `--model` and `--features`, applies them to `cfg` and checks it.
pub fn apply_overrides(
    cfg: &mut TrainConfig,
    indicators: &FeatureConfig,
    model: Option<&str>,
    features: Option<&[String]>,
    epochs: Option<usize>,
) -> Result<()> {
    let columns = indicators.columns();
    if let Some(m) = model {
        cfg.model = m
            .parse::<ModelKind>()
            .map_err(|e| usage(format!("--model: {e}")))?;
    }
    if let Some(f) = features {
        if let Some(bad) = f.iter().find(|f| !columns.contains(f)) {
            return Err(usage(format!(
                "--features: `{bad}` is not a feature ({})",
                columns.join(", ")
            )));
        }
        cfg.features = f.to_vec();
    }
    if let Some(e) = epochs {
        cfg.epochs = e;
    }
    cfg.check(&columns)
        .map_err(|(k, m)| usage(format!("{}: {m}", k.replace("train.", "--"))))
}

/// Trains one model and writes its checkpoint, `loss.png` and `test.png` into `opts.out`.
pub async fn train(opts: TrainOptions) -> Result<Trained> {
    validate_ticker(&opts.ticker).map_err(|e| usage(e.to_string()))?;
    let cfg = opts.train.clone();
    let rows = load_rows(
        &opts.source,
        &opts.ticker,
        opts.interval,
        &opts.indicators,
        &cfg.features,
    )
    .await?;
    let ds = Dataset::build(
        &rows,
        &cfg.features,
        cfg.seq_len,
        cfg.val_fraction,
        cfg.test_fraction,
    )
    .map_err(|e| usage(format!("{} {}: {e}", opts.ticker, opts.interval)))?;
    let device = checked_device(&cfg.device)?;
    eprintln!(
        "training {} {} ({}, {} features, seq_len {}) on {}: {} train / {} validation / {} test windows",
        opts.ticker,
        opts.interval,
        cfg.model,
        cfg.features.len(),
        cfg.seq_len,
        tickmesh_model::device_name(device),
        ds.splits.train.len(),
        ds.splits.validation.len(),
        ds.splits.test.len()
    );
    let bar = if opts.progress {
        let b = ProgressBar::new(cfg.epochs as u64);
        b.set_style(
            ProgressStyle::with_template("epoch {pos:>3}/{len} [{bar:30}] {msg} eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let (c, b) = (cfg.clone(), bar.clone());
    let fitted = tokio::task::spawn_blocking(move || {
        fit::fit(ds, &c, device, |p| {
            b.set_position(p.epoch as u64);
            b.set_message(format!(
                "train {:.4}  val {:.4}  best epoch {}",
                p.train_loss, p.val_loss, p.best_epoch
            ));
        })
    })
    .await
    .map_err(|e| anyhow!("training thread: {e}"))??;
    bar.finish_and_clear();
    let weights = checkpoint::weights_bytes(&fitted.vs)?;
    let meta = Meta::of(
        &fitted,
        &cfg,
        &opts.indicators,
        &opts.ticker,
        opts.interval,
        1,
        &weights,
    );
    let files = Files::new(&meta, weights, &fitted.test_points)?;
    checkpoint::write_dir(&opts.out, &files)?;
    chart::loss_chart(&opts.out.join("loss.png"), &fitted)?;
    chart::test_chart(
        &opts.out.join("test.png"),
        &format!(
            "{} {} {}: test split, one step ahead",
            opts.ticker, opts.interval, cfg.model
        ),
        &fitted.test_points,
    )?;
    Ok(Trained {
        meta,
        fitted,
        dir: opts.out,
    })
}

/// The device of a `device` setting; `cuda` without a usable CUDA device is
/// a [`UsageError`] (libtorch would abort on the first tensor).
pub fn checked_device(setting: &str) -> Result<tch::Device> {
    if setting == "cuda" && !tch::Cuda::is_available() {
        return Err(usage(
            "--device cuda: no CUDA device is available to this libtorch (`tickmesh doctor` says why)",
        ));
    }
    Ok(tickmesh_model::device(setting))
}

/// Options of `tickmesh evaluate`.
#[derive(Debug, Clone)]
pub struct EvaluateOptions {
    pub checkpoint: PathBuf,
    pub source: Source,
    pub from: Option<NaiveDate>,
    pub to: Option<NaiveDate>,
}

/// Re-scores a saved model on the windows whose predicted bar falls in [from, to].
pub async fn evaluate(
    opts: EvaluateOptions,
) -> Result<(Meta, EvalReport, DateTime<Utc>, DateTime<Utc>)> {
    let dir = opts.checkpoint.clone();
    let (meta, weights) = tokio::task::spawn_blocking(move || checkpoint::read_dir(&dir))
        .await
        .map_err(|e| anyhow!("{e}"))?
        .map_err(|e| usage(e.to_string()))?;
    let rows = load_rows(
        &opts.source,
        &meta.ticker,
        meta.interval,
        &meta.indicators,
        &meta.features,
    )
    .await?;
    let day = |d: NaiveDate, end: bool| {
        let t = if end {
            d.and_hms_opt(23, 59, 59)
        } else {
            d.and_hms_opt(0, 0, 0)
        };
        Utc.from_utc_datetime(&t.expect("valid time"))
    };
    let from = opts.from.map(|d| day(d, false));
    let to = opts.to.map(|d| day(d, true));
    let m = meta.clone();
    let span = rows
        .first()
        .zip(rows.last())
        .map(|(a, b)| format!("{} .. {}", a.ts.date_naive(), b.ts.date_naive()))
        .unwrap_or_default();
    let scored =
        tokio::task::spawn_blocking(move || fit::evaluate_range(&m, &weights, &rows, from, to))
            .await
            .map_err(|e| anyhow!("{e}"))?
            .map_err(|e| usage(e.to_string()))?;
    let Some(s) = scored else {
        return Err(usage(format!(
            "no window of {} {} predicts a bar in the range asked (data: {span})",
            meta.ticker, meta.interval
        )));
    };
    Ok((meta, s.report, s.from, s.to))
}

/// What `tickmesh doctor` found out about libtorch and the accelerator.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Doctor {
    pub libtorch_dir: Option<String>,
    pub libtorch_version: Option<String>,
    /// Whether the linked libtorch ships libtorch_cuda.so.
    pub cuda_library_present: bool,
    /// Whether this process loaded it.
    pub cuda_library_loaded: bool,
    pub cuda_available: bool,
    pub cuda_devices: i64,
    pub cudnn_available: bool,
    pub threads: i64,
    /// What `train.device = "auto"` picks.
    pub auto_device: String,
}

/// Inspects the libtorch this process runs on.
pub fn doctor() -> Doctor {
    // Touch libtorch so its libraries are mapped.
    let threads = tch::get_num_threads();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let lib_of = |name: &str| {
        maps.lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .find(|p| Path::new(p).file_name().and_then(|n| n.to_str()) == Some(name))
            .map(PathBuf::from)
    };
    let dir = lib_of("libtorch_cpu.so").and_then(|p| p.parent().map(Path::to_path_buf));
    // The pip wheel has torch/version.py; a libtorch zip has build-version.
    let version = dir.as_ref().and_then(|d| {
        let from_py = std::fs::read_to_string(d.join("../version.py"))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("__version__ = "))
                    .map(|v| v.trim().trim_matches('\'').trim_matches('"').to_string())
            });
        from_py.or_else(|| {
            std::fs::read_to_string(d.join("../build-version"))
                .ok()
                .map(|v| v.trim().to_string())
        })
    });
    Doctor {
        cuda_library_present: dir
            .as_ref()
            .is_some_and(|d| d.join("libtorch_cuda.so").exists()),
        cuda_library_loaded: lib_of("libtorch_cuda.so").is_some(),
        libtorch_dir: dir.map(|d| d.display().to_string()),
        libtorch_version: version,
        cuda_available: tch::Cuda::is_available(),
        cuda_devices: tch::Cuda::device_count(),
        cudnn_available: tch::Cuda::cudnn_is_available(),
        threads: threads as i64,
        auto_device: tickmesh_model::device_name(tickmesh_model::device("auto")),
    }
}

impl std::fmt::Display for Doctor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let yn = |b: bool| if b { "yes" } else { "no" };
        writeln!(
            f,
            "libtorch      {} ({})",
            self.libtorch_version
                .as_deref()
                .unwrap_or("unknown version"),
            self.libtorch_dir
                .as_deref()
                .unwrap_or("not found in this process")
        )?;
        writeln!(
            f,
            "libtorch_cuda {} in that libtorch, {} by tickmesh",
            if self.cuda_library_present {
                "present"
            } else {
                "absent"
            },
            if self.cuda_library_loaded {
                "loaded"
            } else {
                "not loaded"
            }
        )?;
        writeln!(
            f,
            "cuda          available: {}, devices: {}",
            yn(self.cuda_available),
            self.cuda_devices
        )?;
        writeln!(f, "cudnn         available: {}", yn(self.cudnn_available))?;
        writeln!(f, "cpu threads   {}", self.threads)?;
        write!(f, "train.device = \"auto\" picks {}", self.auto_device)
    }
}

/// Resolves the default output directory of `tickmesh train`.
pub fn default_out(ticker: &str, interval: Interval, model: ModelKind) -> PathBuf {
    PathBuf::from(format!("data/models/{ticker}_{interval}_{model}"))
}

/// The config for `--from-db` (or the training defaults).
pub fn load_config(path: Option<&Path>) -> Result<ClusterConfig> {
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    match path {
        Some(p) => ClusterConfig::load(p, &env).map_err(|e| usage(e.to_string())),
        None => ClusterConfig::parse("", "defaults", &env).context("default config"),
    }
}
