//! `tickmesh bench-fused` (hidden; run by `scripts/bench/fused.sh`): many
//! tickers of one model kind trained fused (one computation for a group)
//! and one model at a time, on the same windows with the same
//! hyperparameters, in the same run; the windows are exported for the
//! PyTorch peer (`scripts/bench/fused_peer.py`).

use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, Result};
use serde_json::json;
use tch::Tensor;
use tickmesh_core::config::{ModelKind, TrainConfig};
use tickmesh_core::synthetic::SyntheticMarket;
use tickmesh_core::types::Interval;
use tickmesh_model::dataset::Dataset;
use tickmesh_model::fit::{fit, FitHooks};
use tickmesh_model::fused::{fit_fused, Member};

/// The options of `tickmesh bench-fused`.
pub struct FusedBench<'a> {
    pub kind: ModelKind,
    pub tickers: usize,
    /// Calendar days of synthetic bars per ticker.
    pub days: i64,
    pub interval: Interval,
    pub epochs: usize,
    pub batch_size: usize,
    /// Members per fused group (0: every ticker in one group).
    pub group: usize,
    pub threads: Option<i32>,
    pub device: &'a str,
    /// `fused`, `solo`.
    pub ways: &'a [String],
    pub windows_out: Option<&'a Path>,
}

/// Ticker `k` of the benchmark's synthetic market.
fn ticker(k: usize) -> String {
    format!("FZ{k:02}")
}

/// One ticker's dataset: synthetic 1-minute bars resampled to `interval`,
/// the default indicators, the config's features.
fn dataset(cfg: &TrainConfig, name: &str, days: i64, interval: Interval) -> Result<Dataset> {
    let from: chrono::NaiveDate = "2024-01-02".parse().expect("valid date");
    let bars = SyntheticMarket.bars(name, from, from + chrono::Duration::days(days));
    let bars = if interval == Interval::M1 {
        bars
    } else {
        tickmesh_aggregate::resample::resample(&bars, interval).bars
    };
    crate::bench::dataset_of(cfg, &bars)
}

struct Quiet;

impl FitHooks for Quiet {
    fn epoch(&mut self, _: tickmesh_model::fit::EpochProgress) -> tickmesh_core::Result<()> {
        Ok(())
    }
}

/// Runs the benchmark; one JSON line per way, then one comparing the
/// weights of the two ways when both ran.
pub fn run(o: &FusedBench<'_>) -> Result<()> {
    if let Some(t) = o.threads {
        tch::set_num_threads(t);
    }
    let cfg = TrainConfig {
        model: o.kind,
        epochs: o.epochs,
        patience: o.epochs + 1,
        batch_size: o.batch_size,
        device: o.device.into(),
        ..TrainConfig::default()
    };
    let dev = tickmesh_model::device(o.device);
    let names: Vec<String> = (0..o.tickers).map(ticker).collect();
    let sets: Vec<Dataset> = names
        .iter()
        .map(|n| dataset(&cfg, n, o.days, o.interval))
        .collect::<Result<_>>()?;
    let windows: usize = sets.iter().map(|d| d.splits.train.len()).sum();
    if let Some(p) = o.windows_out {
        let cpu = tch::Device::Cpu;
        let mut named: Vec<(String, Tensor)> = Vec::new();
        for (n, ds) in names.iter().zip(&sets) {
            let (xt, yt) = ds.tensors(ds.splits.train.clone(), cpu);
            let (xv, yv) = ds.tensors(ds.splits.validation.clone(), cpu);
            named.extend([
                (format!("{n}.x_train"), xt),
                (format!("{n}.y_train"), yt),
                (format!("{n}.x_val"), xv),
                (format!("{n}.y_val"), yv),
            ]);
        }
        Tensor::write_safetensors(&named, p).map_err(|e| anyhow!("write {}: {e}", p.display()))?;
    }
    let line = |way: &str, secs: f64, val: f64, extra: serde_json::Value| {
        let mut v = json!({
            "peer": "tickmesh",
            "way": way,
            "kind": o.kind.as_str(),
            "device": tickmesh_model::device_name(dev),
            "threads": tch::get_num_threads(),
            "tickers": o.tickers,
            "interval": o.interval.to_string(),
            "epochs": o.epochs,
            "batch_size": o.batch_size,
            "train_samples": windows,
            "seconds": secs,
            "samples_per_sec": (windows * o.epochs) as f64 / secs,
            "mean_final_val_loss": val,
        });
        if let (Some(a), Some(b)) = (v.as_object_mut(), extra.as_object()) {
            a.extend(b.clone());
        }
        println!("{v}");
    };
    let mean_val = |f: &[tickmesh_model::fit::Fitted]| {
        f.iter()
            .filter_map(|f| f.history.last().map(|p| p.val_loss))
            .sum::<f64>()
            / f.len().max(1) as f64
    };
    let (mut fused_w, mut solo_w) = (None, None);
    for way in o.ways {
        match way.as_str() {
            "fused" => {
                let group = if o.group == 0 { o.tickers } else { o.group };
                let started = Instant::now();
                let mut fitted = Vec::new();
                for chunk in sets.chunks(group.max(1)) {
                    let mut hooks: Vec<Quiet> = chunk.iter().map(|_| Quiet).collect();
                    let members = chunk
                        .iter()
                        .zip(hooks.iter_mut())
                        .map(|(ds, h)| Member {
                            ds: ds.clone(),
                            hooks: h,
                        })
                        .collect();
                    for r in fit_fused(members, &cfg, dev)? {
                        fitted.push(r?);
                    }
                }
                let secs = started.elapsed().as_secs_f64();
                line("fused", secs, mean_val(&fitted), json!({ "group": group }));
                fused_w = Some(
                    fitted
                        .iter()
                        .map(|f| (f.best_epoch, f.vs.variables()))
                        .collect::<Vec<_>>(),
                );
            }
            "solo" => {
                let started = Instant::now();
                let mut fitted = Vec::new();
                for ds in &sets {
                    fitted.push(fit(ds.clone(), &cfg, dev, |_| {})?);
                }
                let secs = started.elapsed().as_secs_f64();
                line("solo", secs, mean_val(&fitted), json!({}));
                solo_w = Some(
                    fitted
                        .iter()
                        .map(|f| (f.best_epoch, f.vs.variables()))
                        .collect::<Vec<_>>(),
                );
            }
            w => return Err(anyhow!("unknown way {w:?} (fused, solo)")),
        }
    }
    if let (Some(a), Some(b)) = (fused_w, solo_w) {
        // The largest weight difference among the models that kept the
        // same epoch's weights, and how many kept another (a near tie of
        // validation losses that rounding decided the other way).
        let (mut worst, mut other_epoch) = (0f64, 0);
        let mut per_model = Vec::new();
        for ((ea, x), (eb, y)) in a.iter().zip(&b) {
            if ea != eb {
                other_epoch += 1;
                per_model.push(None);
                continue;
            }
            let mut m = 0f64;
            for (name, t) in x {
                m = m.max((t - &y[name]).abs().max().double_value(&[]));
            }
            worst = worst.max(m);
            per_model.push(Some(m));
        }
        println!(
            "{}",
            json!({
                "max_weight_diff_fused_vs_solo": worst,
                "best_epoch_differs": other_epoch,
                "max_weight_diff_per_ticker": per_model,
            })
        );
    }
    Ok(())
}
