//! Training: Adam on the MSE of the standardized next log return, minibatches shuffled
//! with a seeded generator, early stopping on the validation loss (the best
//! weights are kept), then metrics on the validation split in price units
//! beside the naive persistence forecast (tomorrow = today).

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Reduction, Tensor};
use tickmesh_core::config::TrainConfig;
use tickmesh_core::db::AggRow;
use tickmesh_core::{Error, Result};

use crate::dataset::Dataset;
use crate::model::LstmAttention;

/// Forecast errors on the validation split, in price units.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub mae: f64,
    pub mse: f64,
    pub rmse: f64,
    /// Share of samples whose predicted direction (vs the last close) is
    /// right; `None` for the naive forecast, which never moves.
    pub directional_accuracy: Option<f64>,
    pub samples: usize,
}

impl Metrics {
    pub fn of(pairs: &[(f64, f64, f64)], directional: bool) -> Self {
        let n = pairs.len().max(1) as f64;
        let mae = pairs.iter().map(|(a, p, _)| (a - p).abs()).sum::<f64>() / n;
        let mse = pairs.iter().map(|(a, p, _)| (a - p).powi(2)).sum::<f64>() / n;
        let dir = directional.then(|| {
            pairs
                .iter()
                .filter(|(a, p, last)| (a - last).signum() == (p - last).signum())
                .count() as f64
                / n
        });
        Metrics {
            mae,
            mse,
            rmse: mse.sqrt(),
            directional_accuracy: dir,
            samples: pairs.len(),
        }
    }
}

/// Model metrics with the naive baseline beside them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub model: Metrics,
    pub naive: Metrics,
}

/// One validation point for charts: time, actual close, predicted close.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ValidationPoint {
    pub ts: chrono::DateTime<chrono::Utc>,
    pub actual: f64,
    pub predicted: f64,
}

/// The result of a fit.
pub struct Fitted {
    pub vs: nn::VarStore,
    pub model: LstmAttention,
    pub dataset: Dataset,
    pub eval: EvalReport,
    pub validation: Vec<ValidationPoint>,
    pub epochs_run: usize,
    pub best_epoch: usize,
    pub best_val_loss: f64,
    pub device: Device,
}

/// Progress of one epoch.
#[derive(Debug, Clone, Copy)]
pub struct EpochProgress {
    pub epoch: usize,
    pub epochs: usize,
    pub train_loss: f64,
    pub val_loss: f64,
}

fn to_tensor(x: &[f32], shape: &[i64], device: Device) -> Tensor {
    Tensor::from_slice(x).reshape(shape).to_device(device)
}

fn predict(model: &LstmAttention, ds: &Dataset, idx: &[usize], device: Device) -> Vec<f64> {
    let f = ds.n_features() as i64;
    let mut out = Vec::with_capacity(idx.len());
    tch::no_grad(|| {
        for chunk in idx.chunks(512) {
            let (x, _) = ds.batch(chunk);
            let xt = to_tensor(&x, &[chunk.len() as i64, ds.seq_len as i64, f], device);
            let y = model.forward(&xt).to_device(Device::Cpu);
            let v: Vec<f32> = Vec::try_from(&y).unwrap_or_default();
            out.extend(v.into_iter().map(f64::from));
        }
    });
    out
}

fn mse_of(model: &LstmAttention, ds: &Dataset, idx: &[usize], device: Device) -> f64 {
    let pred = predict(model, ds, idx, device);
    let (_, y) = ds.batch(idx);
    pred.iter()
        .zip(&y)
        .map(|(p, y)| (p - *y as f64).powi(2))
        .sum::<f64>()
        / idx.len().max(1) as f64
}

/// Trains a model on `rows` (columns in the order of `cfg.features`).
pub fn fit(
    rows: &[AggRow],
    cfg: &TrainConfig,
    device: Device,
    mut progress: impl FnMut(EpochProgress),
) -> Result<Fitted> {
    let ds = Dataset::build(rows, &cfg.features, cfg.seq_len, cfg.val_fraction)?;
    let f = ds.n_features() as i64;
    tch::manual_seed(cfg.seed);
    let vs = nn::VarStore::new(device);
    let model = LstmAttention::new(&vs.root(), f, cfg.hidden, cfg.layers);
    let mut best = nn::VarStore::new(device);
    let _shadow = LstmAttention::new(&best.root(), f, cfg.hidden, cfg.layers);
    let terr = |e: tch::TchError| Error::invalid("training", e.to_string());
    best.copy(&vs).map_err(terr)?;
    let mut opt = nn::Adam::default()
        .build(&vs, cfg.learning_rate)
        .map_err(terr)?;

    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed as u64);
    let mut train_idx: Vec<usize> = (0..ds.split).collect();
    let val_idx: Vec<usize> = (ds.split..ds.n_samples()).collect();
    // Epoch 0 is the untrained model, which predicts about the mean return
    // (see the output layer's init): training must beat it on validation.
    let (mut best_val, mut best_epoch, mut stale, mut epochs_run) =
        (mse_of(&model, &ds, &val_idx, device), 0, 0, 0);
    for epoch in 0..cfg.epochs {
        train_idx.shuffle(&mut rng);
        let (mut sum, mut count) = (0.0, 0usize);
        for chunk in train_idx.chunks(cfg.batch_size) {
            let (x, y) = ds.batch(chunk);
            let xt = to_tensor(&x, &[chunk.len() as i64, ds.seq_len as i64, f], device);
            let yt = to_tensor(&y, &[chunk.len() as i64], device);
            let loss = model.forward(&xt).mse_loss(&yt, Reduction::Mean);
            opt.backward_step(&loss);
            sum += loss.double_value(&[]) * chunk.len() as f64;
            count += chunk.len();
        }
        let val_loss = mse_of(&model, &ds, &val_idx, device);
        epochs_run = epoch + 1;
        progress(EpochProgress {
            epoch: epoch + 1,
            epochs: cfg.epochs,
            train_loss: sum / count.max(1) as f64,
            val_loss,
        });
        if val_loss < best_val {
            best_val = val_loss;
            best_epoch = epoch + 1;
            stale = 0;
            best.copy(&vs).map_err(terr)?;
        } else {
            stale += 1;
            if stale >= cfg.patience {
                break;
            }
        }
    }
    let mut vs = vs;
    vs.copy(&best).map_err(terr)?;

    let pred = predict(&model, &ds, &val_idx, device);
    let mut model_pairs = Vec::with_capacity(val_idx.len());
    let mut naive_pairs = Vec::with_capacity(val_idx.len());
    let mut validation = Vec::with_capacity(val_idx.len());
    for (k, &i) in val_idx.iter().enumerate() {
        let (actual, last) = ds.target_and_last(i);
        let p = ds.target_scale.close_after(last, pred[k]);
        model_pairs.push((actual, p, last));
        naive_pairs.push((actual, last, last));
        validation.push(ValidationPoint {
            ts: ds.ts[i + ds.seq_len],
            actual,
            predicted: p,
        });
    }
    Ok(Fitted {
        vs,
        model,
        eval: EvalReport {
            model: Metrics::of(&model_pairs, true),
            naive: Metrics::of(&naive_pairs, false),
        },
        dataset: ds,
        validation,
        epochs_run,
        best_epoch,
        best_val_loss: best_val,
        device,
    })
}
