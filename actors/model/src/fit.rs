//! Training: Adam with gradient-norm clipping on the MSE of the
//! standardized next log return, minibatches shuffled by a seeded generator,
//! early stopping on the validation loss (the best weights are kept; epoch
//! 0, the untrained model, counts, so training must beat it), then metrics
//! on the test split beside the naive forecast.
//!
//! Deterministic on the CPU for a fixed seed: the weights are initialised
//! and the batches shuffled from generators of the job's own (never
//! libtorch's process-global one), so trainers running at once in one
//! process do not disturb each other.

use std::ops::Range;
use std::time::Instant;

use chrono::{DateTime, Utc};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Reduction, Tensor};
use tickmesh_core::config::TrainConfig;
use tickmesh_core::{Error, Result};

use crate::arch::{build, init_seeded, Arch, SeqModel};
use crate::dataset::Dataset;
use crate::metrics::{EvalReport, Scored};

/// One evaluated sample, for charts and `test.json`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TestPoint {
    /// The time of the predicted bar.
    pub ts: DateTime<Utc>,
    pub actual: f64,
    /// The model's one-step prediction.
    pub predicted: f64,
    /// The naive forecast (the last close).
    pub naive: f64,
}

/// Progress of one epoch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpochProgress {
    pub epoch: usize,
    pub epochs: usize,
    pub train_loss: f64,
    pub val_loss: f64,
    /// The epoch whose weights are kept so far (0: the untrained model).
    pub best_epoch: usize,
}

/// The result of a fit.
pub struct Fitted {
    pub vs: nn::VarStore,
    pub model: Box<dyn SeqModel>,
    pub arch: Arch,
    pub dataset: Dataset,
    /// Metrics on the test split.
    pub eval: EvalReport,
    pub test_points: Vec<TestPoint>,
    /// Validation loss of the untrained model (epoch 0).
    pub initial_val_loss: f64,
    pub history: Vec<EpochProgress>,
    pub epochs_run: usize,
    pub best_epoch: usize,
    pub best_val_loss: f64,
    /// Whether patience ran out before `epochs`.
    pub stopped_early: bool,
    /// Training samples per second over the epochs run (validation passes included).
    pub samples_per_sec: f64,
    pub device: Device,
}

fn terr(e: tch::TchError) -> Error {
    Error::invalid("training", e.to_string())
}

/// Predictions of `model` for inputs `x` `[n, seq, f]`, in chunks.
pub fn predict(model: &dyn SeqModel, x: &Tensor) -> Tensor {
    tch::no_grad(|| {
        let n = x.size()[0];
        let parts: Vec<Tensor> = (0..n)
            .step_by(4096)
            .map(|s| model.forward(&x.narrow(0, s, (n - s).min(4096))))
            .collect();
        if parts.is_empty() {
            Tensor::zeros([0], (Kind::Float, x.device()))
        } else {
            Tensor::cat(&parts, 0)
        }
    })
}

fn mse(model: &dyn SeqModel, x: &Tensor, y: &Tensor) -> f64 {
    predict(model, x)
        .mse_loss(y, Reduction::Mean)
        .double_value(&[])
}

/// Scores `model` on the samples `range` of `ds` in price units.
pub fn evaluate(
    model: &dyn SeqModel,
    ds: &Dataset,
    range: Range<usize>,
    device: Device,
) -> (EvalReport, Vec<TestPoint>) {
    let (x, _) = ds.tensors(range.clone(), device);
    let pred: Vec<f32> =
        Vec::try_from(predict(model, &x).to_device(Device::Cpu)).unwrap_or_default();
    let scale = ds.encoder.target_scale;
    let (mut scored, mut points) = (Vec::new(), Vec::new());
    for (k, i) in range.enumerate() {
        let (actual, last) = ds.target_and_last(i);
        let predicted = scale.close_after(last, pred[k] as f64);
        scored.push(Scored {
            actual,
            predicted,
            last,
        });
        points.push(TestPoint {
            ts: ds.target_ts(i),
            actual,
            predicted,
            naive: last,
        });
    }
    (EvalReport::of(&scored), points)
}

/// Scales the gradients so that their joint L2 norm is at most `max`, as
/// `torch.nn.utils.clip_grad_norm_` does: the factor `min(1, max / (norm +
/// 1e-6))` stays on the device (no synchronisation per step).
fn clip_grad_norm(params: &[Tensor], max: f64) {
    tch::no_grad(|| {
        let grads: Vec<Tensor> = params
            .iter()
            .map(Tensor::grad)
            .filter(Tensor::defined)
            .collect();
        if grads.is_empty() {
            return;
        }
        let norms: Vec<Tensor> = grads.iter().map(Tensor::norm).collect();
        let total = Tensor::stack(&norms, 0).norm();
        let coef = ((total + 1e-6).reciprocal() * max).clamp_max(1.0);
        for mut g in grads {
            let _ = g.g_mul_(&coef);
        }
    })
}

/// Trains a model of `cfg.model` on `ds` (see the module doc).
pub fn fit(
    ds: Dataset,
    cfg: &TrainConfig,
    device: Device,
    mut progress: impl FnMut(EpochProgress),
) -> Result<Fitted> {
    let arch = Arch::of(cfg, ds.n_features());
    let vs = nn::VarStore::new(device);
    let model = build(&vs.root(), &arch);
    init_seeded(&vs, &arch, cfg.seed);
    let mut best = nn::VarStore::new(device);
    let _shadow = build(&best.root(), &arch);
    best.copy(&vs).map_err(terr)?;
    let mut opt = nn::Adam::default()
        .build(&vs, cfg.learning_rate)
        .map_err(terr)?;

    let params = vs.trainable_variables();
    let (x_train, y_train) = ds.tensors(ds.splits.train.clone(), device);
    let (x_val, y_val) = ds.tensors(ds.splits.validation.clone(), device);
    let n_train = ds.splits.train.len();
    let mut order: Vec<i64> = (0..n_train as i64).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed as u64);

    let initial_val_loss = mse(model.as_ref(), &x_val, &y_val);
    let (mut best_val, mut best_epoch, mut stale) = (initial_val_loss, 0, 0);
    let mut history = Vec::new();
    let started = Instant::now();
    for epoch in 1..=cfg.epochs {
        order.shuffle(&mut rng);
        let idx = Tensor::from_slice(&order).to_device(device);
        let mut sum = Tensor::zeros([], (Kind::Float, device));
        for start in (0..n_train).step_by(cfg.batch_size) {
            let len = (n_train - start).min(cfg.batch_size) as i64;
            let b = idx.narrow(0, start as i64, len);
            let loss = model
                .forward(&x_train.index_select(0, &b))
                .mse_loss(&y_train.index_select(0, &b), Reduction::Mean);
            opt.zero_grad();
            loss.backward();
            clip_grad_norm(&params, cfg.clip_grad_norm);
            opt.step();
            sum += loss.detach() * len as f64;
        }
        let train_loss = sum.double_value(&[]) / n_train.max(1) as f64;
        let val_loss = mse(model.as_ref(), &x_val, &y_val);
        if !train_loss.is_finite() {
            return Err(Error::invalid(
                "training",
                format!("the training loss diverged to {train_loss} at epoch {epoch}; lower train.learning_rate"),
            ));
        }
        if val_loss < best_val {
            best_val = val_loss;
            best_epoch = epoch;
            stale = 0;
            best.copy(&vs).map_err(terr)?;
        } else {
            stale += 1;
        }
        let p = EpochProgress {
            epoch,
            epochs: cfg.epochs,
            train_loss,
            val_loss,
            best_epoch,
        };
        history.push(p);
        progress(p);
        if stale >= cfg.patience {
            break;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let epochs_run = history.len();
    let mut vs = vs;
    vs.copy(&best).map_err(terr)?;
    let (eval, test_points) = evaluate(model.as_ref(), &ds, ds.splits.test.clone(), device);
    if !eval.is_finite() {
        return Err(Error::invalid(
            "training",
            "the test metrics are not finite (the model predicts NaN or infinite returns); lower train.learning_rate",
        ));
    }
    Ok(Fitted {
        vs,
        model,
        arch,
        dataset: ds,
        eval,
        test_points,
        initial_val_loss,
        history,
        epochs_run,
        best_epoch,
        best_val_loss: best_val,
        stopped_early: epochs_run < cfg.epochs,
        samples_per_sec: (n_train * epochs_run) as f64 / secs.max(1e-9),
        device,
    })
}
