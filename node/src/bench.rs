//! `tickmesh bench-train` (hidden; run by `scripts/bench/train.sh`): the
//! training throughput of each model kind on deterministic synthetic
//! 1-minute bars, with the windows exported so that the PyTorch peer
//! (`scripts/bench/train_peer.py`) trains the same model on the same data
//! with the same hyperparameters in the same run.

use std::path::Path;

use anyhow::{anyhow, Result};
use serde_json::json;
use tch::Tensor;
use tickmesh_core::config::{FeatureConfig, ModelKind, TrainConfig};
use tickmesh_core::synthetic::SyntheticMarket;
use tickmesh_core::types::AggRow;
use tickmesh_model::dataset::Dataset;

/// The dataset of the benchmark: `days` trading days of synthetic 1-minute bars.
pub fn dataset(cfg: &TrainConfig, days: i64) -> Result<Dataset> {
    let from: chrono::NaiveDate = "2024-01-02".parse().expect("valid date");
    let bars = SyntheticMarket.bars("BENCH", from, from + chrono::Duration::days(days * 7 / 5));
    dataset_of(cfg, &bars)
}

/// The windows of `cfg`'s features over `bars`, with the default indicators.
pub fn dataset_of(cfg: &TrainConfig, bars: &[tickmesh_core::types::Bar]) -> Result<Dataset> {
    let indicators = FeatureConfig::default();
    let all = indicators.columns();
    let cols: Vec<usize> = cfg
        .features
        .iter()
        .map(|f| tickmesh_features::column_index(&all, f).expect("checked"))
        .collect();
    let rows: Vec<AggRow> = tickmesh_features::feature_rows(&indicators, bars)
        .into_iter()
        .map(|r| AggRow {
            ts: r.ts,
            values: cols.iter().map(|&c| r.values[c]).collect(),
        })
        .collect();
    Ok(Dataset::build(
        &rows,
        &cfg.features,
        cfg.seq_len,
        cfg.val_fraction,
        cfg.test_fraction,
    )?)
}

/// Writes the training and validation windows for the peer.
pub fn export(ds: &Dataset, path: &Path) -> Result<()> {
    let cpu = tch::Device::Cpu;
    let (xt, yt) = ds.tensors(ds.splits.train.clone(), cpu);
    let (xv, yv) = ds.tensors(ds.splits.validation.clone(), cpu);
    Tensor::write_safetensors(
        &[
            ("x_train", &xt),
            ("y_train", &yt),
            ("x_val", &xv),
            ("y_val", &yv),
        ],
        path,
    )
    .map_err(|e| anyhow!("write {}: {e}", path.display()))
}

/// Trains each kind for exactly `epochs` epochs; one JSON line per kind.
pub fn run(
    kinds: &[ModelKind],
    days: i64,
    epochs: usize,
    threads: Option<i32>,
    device: &str,
    windows_out: Option<&Path>,
) -> Result<()> {
    if let Some(t) = threads {
        tch::set_num_threads(t);
    }
    let base = TrainConfig {
        epochs,
        patience: epochs + 1,
        device: device.into(),
        ..TrainConfig::default()
    };
    let ds = dataset(&base, days)?;
    if let Some(p) = windows_out {
        export(&ds, p)?;
    }
    let dev = tickmesh_model::device(device);
    for &kind in kinds {
        let cfg = TrainConfig {
            model: kind,
            ..base.clone()
        };
        let f = tickmesh_model::fit::fit(ds.clone(), &cfg, dev, |_| {})?;
        let n = ds.splits.train.len();
        println!(
            "{}",
            json!({
                "peer": "tickmesh",
                "kind": kind.as_str(),
                "device": tickmesh_model::device_name(dev),
                "threads": tch::get_num_threads(),
                "epochs": f.epochs_run,
                "train_samples": n,
                "seconds": (n * f.epochs_run) as f64 / f.samples_per_sec,
                "samples_per_sec": f.samples_per_sec,
                "final_train_loss": f.history.last().map(|p| p.train_loss),
                "final_val_loss": f.history.last().map(|p| p.val_loss),
            })
        );
    }
    Ok(())
}

/// The median of `runs` timings of `f`, in microseconds.
fn median_us(runs: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = std::time::Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// `tickmesh bench-forecast` (hidden; run by `scripts/bench/serve.sh`): for
/// each kind, a model fitted for one epoch on synthetic 1-minute bars
/// (the defaults: hidden 32, seq_len 30, 4 features), then the median time
/// of one forward pass on one window, native (what forecasts run) and
/// libtorch (the same weights, batch 1, no grad, one intra-op thread), and
/// of a whole `steps`-step forecast from the stored history. One JSON line
/// per kind.
pub fn forecast(kinds: &[ModelKind], steps: usize) -> Result<()> {
    use tickmesh_core::types::Interval;
    use tickmesh_model::checkpoint::{self, Meta};
    use tickmesh_model::forecast::Forecaster;
    use tickmesh_model::native::{NativeModel, Scratch};
    tch::set_num_threads(1);
    let indicators = FeatureConfig::default();
    let from: chrono::NaiveDate = "2024-01-02".parse().expect("valid date");
    let bars = SyntheticMarket.bars("BENCH", from, from + chrono::Duration::days(10));
    let stored: Vec<AggRow> = tickmesh_features::feature_rows(&indicators, &bars);
    for &kind in kinds {
        let cfg = TrainConfig {
            model: kind,
            epochs: 1,
            device: "cpu".into(),
            ..TrainConfig::default()
        };
        let ds = dataset(&cfg, 5)?;
        let window = ds.window(ds.splits.test.start);
        let fitted = tickmesh_model::fit::fit(ds, &cfg, tch::Device::Cpu, |_| {})?;
        let weights = checkpoint::weights_bytes(&fitted.vs)?;
        let arch = fitted.arch;
        let native = NativeModel::from_vars(&arch, &fitted.vs.variables())?;
        let mut scratch = Scratch::default();
        let native_us = median_us(2001, || {
            std::hint::black_box(native.forward(&window, &mut scratch));
        });
        let x = Tensor::from_slice(&window).reshape([1, cfg.seq_len as i64, arch.features]);
        let torch_us = median_us(2001, || {
            std::hint::black_box(tch::no_grad(|| fitted.model.forward(&x)).double_value(&[0]));
        });
        let meta = Meta::of(
            &fitted,
            &cfg,
            &indicators,
            "BENCH",
            Interval::M1,
            1,
            &weights,
        );
        let forecaster = Forecaster::load(meta, &weights)?;
        let history = forecaster.history_of(&stored)?;
        let forecast_us = median_us(51, || {
            std::hint::black_box(forecaster.forecast(&history, steps).expect("a forecast"));
        });
        println!(
            "{}",
            json!({
                "kind": kind.as_str(),
                "hidden": arch.hidden,
                "seq_len": cfg.seq_len,
                "features": arch.features,
                "native_forward_us": native_us,
                "libtorch_forward_us": torch_us,
                "libtorch_over_native": torch_us / native_us,
                "steps": steps,
                "forecast_us": forecast_us,
                "per_step_us": forecast_us / steps as f64,
            })
        );
    }
    Ok(())
}
