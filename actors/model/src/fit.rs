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
use tch::nn;
use tch::{Device, Kind, Reduction, Tensor};
use tickmesh_core::config::TrainConfig;
use tickmesh_core::types::AggRow;
use tickmesh_core::{Error, Result};

use crate::arch::{build, init_seeded, Arch, SeqModel};
use crate::checkpoint::{load_model, Meta};
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
    /// The snapshot's epoch when the fit resumed from one.
    pub resumed_from_epoch: Option<usize>,
    pub best_epoch: usize,
    pub best_val_loss: f64,
    /// Whether patience ran out before `epochs`.
    pub stopped_early: bool,
    /// Training samples per second over the epochs run (validation passes included).
    pub samples_per_sec: f64,
    pub device: Device,
    /// The size of the fused group it was trained in ([`crate::fused`]);
    /// `None` when it was trained alone.
    pub fused_group: Option<usize>,
}

pub(crate) fn terr(e: tch::TchError) -> Error {
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

/// What [`evaluate_range`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct RangeScore {
    pub report: EvalReport,
    /// The first and last predicted bar scored.
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

/// Scores a checkpoint (`meta`, `weights`) on the windows of `rows` (its
/// features, oldest first) whose predicted bar falls in `[from, to]` (open
/// ends where `None`), with its own encoding; `None` when no window does.
/// `tickmesh evaluate` and the promotion gate (the champion scored on a
/// challenger's test window) use it.
pub fn evaluate_range(
    meta: &Meta,
    weights: &[u8],
    rows: &[AggRow],
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> Result<Option<RangeScore>> {
    let encoder = meta.encoder()?;
    let ds = Dataset::with_encoder(rows, &meta.features, meta.seq_len, encoder)?;
    let inside: Vec<usize> = (0..ds.n_samples())
        .filter(|&i| {
            let t = ds.target_ts(i);
            from.is_none_or(|f| t >= f) && to.is_none_or(|e| t <= e)
        })
        .collect();
    let (Some(&first), Some(&last)) = (inside.first(), inside.last()) else {
        return Ok(None);
    };
    let device = Device::Cpu;
    let (_vs, model) = load_model(meta, weights, device)?;
    let (report, _) = evaluate(model.as_ref(), &ds, first..last + 1, device);
    Ok(Some(RangeScore {
        report,
        from: ds.target_ts(first),
        to: ds.target_ts(last),
    }))
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

/// Adam with bias correction (β = 0.9/0.999, ε = 1e-8; no weight decay, no amsgrad),
/// with its moments in tensors we own, so a [`Snapshot`] can carry them.
/// Its steps equal `torch.optim.Adam`'s to 1e-6 (test `torch_parity`).
struct Adam {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    step: i64,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl Adam {
    fn new(params: &[Tensor], lr: f64) -> Self {
        Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 0,
            m: params.iter().map(Tensor::zeros_like).collect(),
            v: params.iter().map(Tensor::zeros_like).collect(),
        }
    }

    fn zero_grad(params: &[Tensor]) {
        for p in params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.detach_();
                let _ = g.zero_();
            }
        }
    }

    fn step(&mut self, params: &[Tensor]) {
        self.step += 1;
        let bc1 = 1.0 - self.beta1.powi(self.step as i32);
        let bc2 = 1.0 - self.beta2.powi(self.step as i32);
        let step_size = self.lr / bc1;
        let bc2_sqrt = bc2.sqrt();
        tch::no_grad(|| {
            for ((p, m), v) in params.iter().zip(&mut self.m).zip(&mut self.v) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let _ = m.lerp_(&g, 1.0 - self.beta1);
                let _ = v.g_mul_scalar_(self.beta2);
                let _ = v.addcmul_(&(&g * (1.0 - self.beta2)), &g);
                let denom = (v.sqrt() / bc2_sqrt).g_add_scalar_(self.eps);
                let mut p = p.shallow_clone();
                let _ = p.addcdiv_(&(&*m * -step_size), &denom);
            }
        })
    }
}

/// The counters of a fit after some epoch (the tensors are in [`Snapshot`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotState {
    /// The last finished epoch.
    pub epoch: usize,
    pub best_epoch: usize,
    pub best_val_loss: f64,
    /// Epochs since the best one (early stopping).
    pub stale: usize,
    pub initial_val_loss: f64,
    pub adam_step: i64,
    pub history: Vec<EpochProgress>,
    /// [`fingerprint`] of the data and hyperparameters it was trained on:
    /// a snapshot only resumes the same fit.
    pub fingerprint: String,
    /// The last data row the fit used (a resumed fit reads no further).
    pub data_to: DateTime<Utc>,
    pub train_seconds: f64,
}

/// Everything a fit needs to go on after an epoch exactly as if it had not
/// stopped: the weights, the best weights so far, Adam's moments and the
/// counters. Tensors are named `w.{param}`, `best.{param}`, `m.{param}`,
/// `v.{param}`.
pub struct Snapshot {
    pub state: SnapshotState,
    pub tensors: Vec<(String, Tensor)>,
}

impl Snapshot {
    /// `(state.safetensors, state.json)`.
    pub fn encode(&self) -> Result<(Vec<u8>, Vec<u8>)> {
        let dir = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
        let path = dir.path().join("state.safetensors");
        let cpu: Vec<(String, Tensor)> = self
            .tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.to_device(Device::Cpu)))
            .collect();
        Tensor::write_safetensors(&cpu, &path).map_err(terr)?;
        let tensors = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let state = serde_json::to_vec_pretty(&self.state)
            .map_err(|e| Error::invalid("snapshot", e.to_string()))?;
        Ok((tensors, state))
    }

    pub fn decode(tensors: &[u8], state: &[u8]) -> Result<Self> {
        let state: SnapshotState = serde_json::from_slice(state)
            .map_err(|e| Error::invalid("snapshot state.json", e.to_string()))?;
        let dir = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
        let path = dir.path().join("state.safetensors");
        std::fs::write(&path, tensors).map_err(|e| Error::io(&path, e))?;
        let tensors = Tensor::read_safetensors(&path)
            .map_err(|e| Error::invalid("snapshot state.safetensors", e.to_string()))?;
        Ok(Snapshot { state, tensors })
    }
}

/// What a fit is computed from: the architecture, the hyperparameters that
/// change the trajectory, and the data. Equal fingerprints mean a snapshot
/// of one fit can resume the other.
pub fn fingerprint(ds: &Dataset, cfg: &TrainConfig) -> String {
    let arch = Arch::of(cfg, ds.n_features());
    let v = serde_json::json!({
        "arch": arch,
        "features": ds.features,
        "seq_len": ds.seq_len,
        "batch_size": cfg.batch_size,
        "learning_rate": cfg.learning_rate,
        "clip_grad_norm": cfg.clip_grad_norm,
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "seed": cfg.seed,
        "rows": ds.rows.len(),
        "from": ds.ts.first(),
        "to": ds.ts.last(),
        "data": tickmesh_io::store::sha256_hex(
            &ds.rows.iter().flatten().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()
        ),
    });
    tickmesh_io::store::sha256_hex(v.to_string().as_bytes())
}

/// Called by [`fit_with`] after each epoch.
pub trait FitHooks {
    /// An epoch finished; an `Err` stops the fit with that error (the lease
    /// was lost, the job was cancelled).
    fn epoch(&mut self, p: EpochProgress) -> Result<()>;
    /// Take a snapshot after every this many epochs (0: never).
    fn snapshot_every(&self) -> usize {
        0
    }
    /// A snapshot was taken; an `Err` stops the fit.
    fn snapshot(&mut self, _s: Snapshot) -> Result<()> {
        Ok(())
    }
    /// Weights to start from instead of the seeded initialisation (a warm
    /// start from the champion), every parameter by name; not used when the
    /// fit resumes from a snapshot. Shapes are checked.
    fn initial_weights(&mut self) -> Option<Vec<(String, Tensor)>> {
        None
    }
}

struct Progress<F>(F);

impl<F: FnMut(EpochProgress)> FitHooks for Progress<F> {
    fn epoch(&mut self, p: EpochProgress) -> Result<()> {
        (self.0)(p);
        Ok(())
    }
}

/// Trains a model of `cfg.model` on `ds` (see the module doc).
pub fn fit(
    ds: Dataset,
    cfg: &TrainConfig,
    device: Device,
    progress: impl FnMut(EpochProgress),
) -> Result<Fitted> {
    fit_with(ds, cfg, device, None, &mut Progress(progress))
}

pub(crate) fn named(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Sets every parameter of `vs` from `start` (a warm start), checking
/// that the names and shapes are the model's.
pub(crate) fn set_initial_weights(
    vs: &nn::VarStore,
    start: Vec<(String, Tensor)>,
    device: Device,
) -> Result<()> {
    let vars = vs.variables();
    if start.len() != vars.len() {
        return Err(Error::invalid(
            "warm start",
            format!("{} tensors for a model of {}", start.len(), vars.len()),
        ));
    }
    for (name, t) in start {
        let dst = vars
            .get(&name)
            .ok_or_else(|| Error::invalid("warm start", format!("the model has no `{name}`")))?;
        if dst.size() != t.size() {
            return Err(Error::invalid(
                "warm start",
                format!("`{name}` has shape {:?}, not {:?}", t.size(), dst.size()),
            ));
        }
        tch::no_grad(|| dst.shallow_clone().copy_(&t.to_device(device)));
    }
    Ok(())
}

/// [`fit`], resuming from `resume` when given (it must carry the same
/// [`fingerprint`]), with hooks for progress and snapshots. A resumed fit
/// ends with the same weights as one that never stopped.
pub fn fit_with(
    ds: Dataset,
    cfg: &TrainConfig,
    device: Device,
    resume: Option<Snapshot>,
    hooks: &mut dyn FitHooks,
) -> Result<Fitted> {
    let arch = Arch::of(cfg, ds.n_features());
    let print = fingerprint(&ds, cfg);
    let mut vs = nn::VarStore::new(device);
    let model = build(&vs.root(), &arch);
    init_seeded(&vs, &arch, cfg.seed);
    if resume.is_none() {
        if let Some(start) = hooks.initial_weights() {
            set_initial_weights(&vs, start, device)?;
        }
    }
    let mut best = nn::VarStore::new(device);
    let _shadow = build(&best.root(), &arch);
    best.copy(&vs).map_err(terr)?;

    // Parameters in name order, so snapshots line up with them.
    let names: Vec<String> = named(&vs).into_iter().map(|(n, _)| n).collect();
    let params: Vec<Tensor> = named(&vs).into_iter().map(|(_, t)| t).collect();
    let best_params: Vec<Tensor> = named(&best).into_iter().map(|(_, t)| t).collect();
    let mut opt = Adam::new(&params, cfg.learning_rate);

    let (x_train, y_train) = ds.tensors(ds.splits.train.clone(), device);
    let (x_val, y_val) = ds.tensors(ds.splits.validation.clone(), device);
    let n_train = ds.splits.train.len();

    let resumed_from_epoch = resume.as_ref().map(|s| s.state.epoch);
    let (
        mut first,
        mut best_val,
        mut best_epoch,
        mut stale,
        initial_val_loss,
        mut history,
        mut secs0,
    ) = match resume {
        None => {
            let initial = mse(model.as_ref(), &x_val, &y_val);
            (1, initial, 0, 0, initial, Vec::new(), 0.0)
        }
        Some(s) => {
            if s.state.fingerprint != print {
                return Err(Error::invalid(
                    "snapshot",
                    "the snapshot was taken on other data or hyperparameters",
                ));
            }
            let mut by_name: std::collections::HashMap<String, Tensor> =
                s.tensors.into_iter().collect();
            let mut take = |prefix: &str, dst: &[Tensor]| -> Result<()> {
                for (n, d) in names.iter().zip(dst) {
                    let key = format!("{prefix}.{n}");
                    let t = by_name.remove(&key).ok_or_else(|| {
                        Error::invalid("snapshot", format!("tensor `{key}` is missing"))
                    })?;
                    if t.size() != d.size() {
                        return Err(Error::invalid(
                            "snapshot",
                            format!(
                                "tensor `{key}` has shape {:?}, not {:?}",
                                t.size(),
                                d.size()
                            ),
                        ));
                    }
                    tch::no_grad(|| d.shallow_clone().copy_(&t));
                }
                Ok(())
            };
            take("w", &params)?;
            take("best", &best_params)?;
            take("m", &opt.m)?;
            take("v", &opt.v)?;
            opt.step = s.state.adam_step;
            let st = s.state;
            (
                st.epoch + 1,
                st.best_val_loss,
                st.best_epoch,
                st.stale,
                st.initial_val_loss,
                st.history,
                st.train_seconds,
            )
        }
    };
    if stale >= cfg.patience && first > 1 {
        // The snapshot was taken when patience had already run out.
        first = cfg.epochs + 1;
    }

    let started = Instant::now();
    for epoch in first..=cfg.epochs {
        // Each epoch's shuffle comes from the seed and the epoch alone, so a
        // resumed fit shuffles as the uninterrupted one would have.
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            (cfg.seed as u64) ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let mut order: Vec<i64> = (0..n_train as i64).collect();
        order.shuffle(&mut rng);
        let idx = Tensor::from_slice(&order).to_device(device);
        let mut sum = Tensor::zeros([], (Kind::Float, device));
        for start in (0..n_train).step_by(cfg.batch_size) {
            let len = (n_train - start).min(cfg.batch_size) as i64;
            let b = idx.narrow(0, start as i64, len);
            let loss = model
                .forward(&x_train.index_select(0, &b))
                .mse_loss(&y_train.index_select(0, &b), Reduction::Mean);
            Adam::zero_grad(&params);
            loss.backward();
            clip_grad_norm(&params, cfg.clip_grad_norm);
            opt.step(&params);
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
        hooks.epoch(p)?;
        let done = stale >= cfg.patience || epoch == cfg.epochs;
        let every = hooks.snapshot_every();
        if every > 0 && epoch % every == 0 && !done {
            let mut tensors = Vec::with_capacity(names.len() * 4);
            for (prefix, ts) in [
                ("w", &params),
                ("best", &best_params),
                ("m", &opt.m),
                ("v", &opt.v),
            ] {
                for (n, t) in names.iter().zip(ts.iter()) {
                    tensors.push((format!("{prefix}.{n}"), t.detach().copy()));
                }
            }
            hooks.snapshot(Snapshot {
                state: SnapshotState {
                    epoch,
                    best_epoch,
                    best_val_loss: best_val,
                    stale,
                    initial_val_loss,
                    adam_step: opt.step,
                    history: history.clone(),
                    fingerprint: print.clone(),
                    data_to: *ds.ts.last().expect("a dataset has rows"),
                    train_seconds: secs0 + started.elapsed().as_secs_f64(),
                },
                tensors,
            })?;
        }
        if stale >= cfg.patience {
            break;
        }
    }
    secs0 += started.elapsed().as_secs_f64();
    let epochs_run = history.len();
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
        resumed_from_epoch,
        best_epoch,
        best_val_loss: best_val,
        stopped_early: epochs_run < cfg.epochs,
        samples_per_sec: (n_train * epochs_run) as f64 / secs0.max(1e-9),
        device,
        fused_group: None,
    })
}

#[cfg(test)]
mod torch_parity {
    //! `Adam` and `clip_grad_norm` against `torch.optim.Adam` and
    //! `torch.nn.utils.clip_grad_norm_` (scripts/py/adam_parity.py, run by
    //! the torch venv that scripts/setup.sh installs).
    use super::*;
    use rand::{Rng, SeedableRng};

    fn python() -> String {
        let py = std::env::var("TICKMESH_PYTHON").unwrap_or_else(|_| "python".into());
        let ok = std::process::Command::new(&py)
            .args(["-c", "import torch, safetensors"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "`{py}` cannot import torch and safetensors: run scripts/setup.sh and `. scripts/env.sh` (scripts/test.sh does both)"
        );
        py
    }

    /// Runs `steps` steps of ours and of PyTorch's from the same parameters
    /// and gradients; the largest difference of the final parameters.
    fn compare(lr: f64, clip: f64, steps: usize, seed: u64) -> f64 {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let shapes: [(&str, &[i64]); 3] = [("a", &[7, 5]), ("b", &[5]), ("c", &[3, 2, 4])];
        let mut rand_t = |shape: &[i64], scale: f32| {
            let n: i64 = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
            Tensor::from_slice(&v).reshape(shape)
        };
        let mut saved: Vec<(String, Tensor)> = Vec::new();
        let params: Vec<Tensor> = shapes
            .iter()
            .map(|(n, s)| {
                let t = rand_t(s, 1.0);
                saved.push((format!("p.{n}"), t.copy()));
                t.set_requires_grad(true)
            })
            .collect();
        let mut grads = Vec::new();
        for step in 0..steps {
            // Gradients of every size, some large enough to be clipped.
            let scale = if step % 3 == 0 { 5.0 } else { 0.05 };
            let g: Vec<Tensor> = shapes.iter().map(|(_, s)| rand_t(s, scale)).collect();
            for ((n, _), t) in shapes.iter().zip(&g) {
                saved.push((format!("g.{step}.{n}"), t.copy()));
            }
            grads.push(g);
        }
        let inp = dir.path().join("in.safetensors");
        let named: Vec<(&str, &Tensor)> = saved.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(&named, &inp).unwrap();

        let mut opt = Adam::new(&params, lr);
        for g in &grads {
            Adam::zero_grad(&params);
            // sum(p · g) has gradient g.
            let loss = params
                .iter()
                .zip(g)
                .map(|(p, g)| (p * g).sum(Kind::Float))
                .reduce(|a, b| a + b)
                .unwrap();
            loss.backward();
            if clip > 0.0 {
                clip_grad_norm(&params, clip);
            }
            opt.step(&params);
        }

        let out = dir.path().join("out.json");
        let st = std::process::Command::new(python())
            .arg(
                std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("../../scripts/py/adam_parity.py"),
            )
            .args([
                "--inp",
                inp.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
            .args(["--lr", &lr.to_string(), "--clip", &clip.to_string()])
            .args(["--steps", &steps.to_string()])
            .env("PYTHONWARNINGS", "ignore")
            .status()
            .unwrap();
        assert!(st.success(), "adam_parity.py failed");
        let theirs: std::collections::HashMap<String, Vec<f32>> =
            serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        let mut worst = 0.0f64;
        let mut moved = 0.0f64;
        for ((n, _), p) in shapes.iter().zip(&params) {
            let start = &saved
                .iter()
                .find(|(k, _)| *k == format!("p.{n}"))
                .unwrap()
                .1;
            moved = moved.max((p.detach() - start).abs().max().double_value(&[]));
            let ours: Vec<f32> = Vec::try_from(p.detach().flatten(0, -1)).unwrap();
            let t = &theirs[*n];
            assert_eq!(ours.len(), t.len());
            for (a, b) in ours.iter().zip(t) {
                worst = worst.max((a - b).abs() as f64);
            }
        }
        assert!(moved > 1e-3, "the steps moved the parameters ({moved})");
        worst
    }

    #[test]
    fn adam_equals_torch_optim_adam() {
        let d = compare(1e-3, 0.0, 25, 1);
        eprintln!("Adam, lr 1e-3, 25 steps: max |ours - torch| = {d:e}");
        assert!(d <= 1e-6, "max |ours - torch| = {d}");
        let d = compare(0.05, 0.0, 10, 2);
        eprintln!("Adam, lr 0.05, 10 steps: max |ours - torch| = {d:e}");
        assert!(d <= 1e-6, "max |ours - torch| = {d} at lr 0.05");
    }

    #[test]
    fn clipping_then_adam_equals_clip_grad_norm_then_torch_optim_adam() {
        let d = compare(1e-3, 1.0, 25, 3);
        eprintln!("clip 1.0 then Adam, 25 steps: max |ours - torch| = {d:e}");
        assert!(d <= 1e-6, "max |ours - torch| = {d}");
    }
}
