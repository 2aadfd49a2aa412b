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
    let indicators = FeatureConfig::default();
    let all = indicators.columns();
    let cols: Vec<usize> = cfg
        .features
        .iter()
        .map(|f| tickmesh_features::column_index(&all, f).expect("checked"))
        .collect();
    let rows: Vec<AggRow> = tickmesh_features::feature_rows(&indicators, &bars)
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
