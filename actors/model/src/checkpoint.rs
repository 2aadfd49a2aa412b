//! Checkpoints: `model.safetensors` (PyTorch's names and layouts),
//! `meta.json` (everything needed to rebuild the model and its inputs) and
//! `test.json` (the test split's one-step predictions, for charts).
//!
//! In the object store (bucket `models`) a checkpoint is first written under
//! a staging prefix, `{ticker}/{interval}/.staging/v{N}-{nonce}/`, then
//! published by copying each file to `{ticker}/{interval}/v{N}/` with
//! meta.json last: a checkpoint without meta.json is incomplete and never
//! read. A local checkpoint directory (`tickmesh train --out DIR`) is
//! written to a temporary directory and renamed into place.
//!
//! Integrity: meta.json carries the sha256 of the weights, and the
//! checkpoint's digest, which the registry records and the `CHECKSUM` file
//! of a local checkpoint holds, covers both files:
//! `sha256("tickmesh-checkpoint-v1\n" + sha256(weights) + "\n" + sha256(meta.json) + "\n")`.
//! A reader refuses a checkpoint whose weights or meta.json do not match,
//! naming which one.

use std::path::Path;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tch::nn;
use tickmesh_core::config::{FeatureConfig, ModelKind, TrainConfig};
use tickmesh_core::types::{model_prefix, Interval};
use tickmesh_core::{Error, Result};
use tickmesh_io::store::{buckets, sha256_hex, ObjectStore};
use tracing::warn;

use crate::arch::{build, Arch, SeqModel};
use crate::dataset::{encoding_of, target_column, Encoder, MinMaxScaler, TargetScale, TARGET};
use crate::fit::{Fitted, TestPoint};
use crate::metrics::EvalReport;

/// A span of data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataRange {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub rows: usize,
}

/// How many windows each split had, and what the test split covered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitSizes {
    pub train: usize,
    pub validation: usize,
    pub test: usize,
    pub test_from: DateTime<Utc>,
    pub test_to: DateTime<Utc>,
}

/// `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub kind: ModelKind,
    pub ticker: String,
    pub interval: Interval,
    pub version: i64,
    pub features: Vec<String>,
    /// The indicator periods of the `aggregated_data` the model was trained
    /// on: the forecaster advances the same indicators through predicted
    /// bars. (Checkpoints from before the key have the default periods.)
    #[serde(default)]
    pub indicators: FeatureConfig,
    /// `log_return`: the model predicts the standardized next log return of close.
    pub target: String,
    pub target_scale: TargetScale,
    pub seq_len: usize,
    pub hidden: i64,
    pub layers: i64,
    pub conv_channels: i64,
    pub kernel_size: i64,
    /// Fitted on the training split only.
    pub scaler: MinMaxScaler,
    /// The `[train]` config the model was trained with, as JSON (kept as
    /// written, so later config keys never make an old checkpoint unreadable).
    pub hyperparameters: serde_json::Value,
    /// On the test split, beside the naive forecast.
    pub metrics: EvalReport,
    pub splits: SplitSizes,
    pub data: DataRange,
    pub epochs_run: usize,
    /// The epoch of the snapshot this fit resumed from (a job handed over
    /// from another node); absent when it ran from the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from_epoch: Option<usize>,
    /// The champion version whose weights the fit started from (a warm
    /// start); absent when it started from the seeded initialisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_start_from: Option<i64>,
    /// Trained fused with this many models of the same shape (one
    /// computation on its device); absent when trained alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fused_group: Option<usize>,
    pub best_epoch: usize,
    pub stopped_early: bool,
    pub initial_val_loss: f64,
    pub best_val_loss: f64,
    /// sha256 of model.safetensors.
    pub sha256: String,
    pub device: String,
    pub trained_at: DateTime<Utc>,
}

impl Meta {
    /// The meta.json of a fit, for the weights `weights`.
    pub fn of(
        fitted: &Fitted,
        cfg: &TrainConfig,
        indicators: &FeatureConfig,
        ticker: &str,
        interval: Interval,
        version: i64,
        weights: &[u8],
    ) -> Self {
        let ds = &fitted.dataset;
        let test = &ds.splits.test;
        Meta {
            kind: fitted.arch.kind,
            ticker: ticker.to_string(),
            interval,
            version,
            features: ds.features.clone(),
            indicators: indicators.clone(),
            target: TARGET.into(),
            target_scale: ds.encoder.target_scale,
            seq_len: ds.seq_len,
            hidden: fitted.arch.hidden,
            layers: fitted.arch.layers,
            conv_channels: fitted.arch.conv_channels,
            kernel_size: fitted.arch.kernel_size,
            scaler: ds.encoder.scaler.clone(),
            hyperparameters: serde_json::to_value(cfg).unwrap_or_default(),
            metrics: fitted.eval,
            splits: SplitSizes {
                train: ds.splits.train.len(),
                validation: ds.splits.validation.len(),
                test: test.len(),
                test_from: ds.target_ts(test.start),
                test_to: ds.target_ts(test.end - 1),
            },
            data: DataRange {
                from: ds.ts[0],
                to: *ds.ts.last().expect("a dataset has rows"),
                rows: ds.rows.len(),
            },
            epochs_run: fitted.epochs_run,
            resumed_from_epoch: fitted.resumed_from_epoch,
            warm_start_from: None,
            fused_group: fitted.fused_group,
            best_epoch: fitted.best_epoch,
            stopped_early: fitted.stopped_early,
            initial_val_loss: fitted.initial_val_loss,
            best_val_loss: fitted.best_val_loss,
            sha256: sha256_hex(weights),
            device: crate::device_name(fitted.device),
            trained_at: Utc::now(),
        }
    }

    pub fn arch(&self) -> Arch {
        Arch {
            kind: self.kind,
            features: self.features.len() as i64,
            hidden: self.hidden,
            layers: self.layers,
            conv_channels: self.conv_channels,
            kernel_size: self.kernel_size,
        }
    }

    /// The input encoding the model was trained with; checks that meta.json
    /// describes a model this build can serve.
    pub fn encoder(&self) -> Result<Encoder> {
        let bad = |m: String| Err(Error::invalid("checkpoint", format!("meta.json: {m}")));
        if let Err((key, m)) = self.indicators.check() {
            return bad(format!("indicators: {key}: {m}"));
        }
        let columns = self.indicators.columns();
        if let Some(f) = self.features.iter().find(|f| !columns.contains(f)) {
            return bad(format!("unknown feature `{f}`"));
        }
        if self.target != TARGET {
            return bad(format!("unknown target `{}`", self.target));
        }
        let Some(target) = target_column(&self.features) else {
            return bad("the features lack close".into());
        };
        let f = self.features.len();
        if self.scaler.min.len() != f || self.scaler.max.len() != f {
            return bad(format!(
                "the scaler has {} columns for {f} features",
                self.scaler.min.len()
            ));
        }
        if self.seq_len < 2 || self.hidden < 1 || self.layers < 1 {
            return bad("seq_len, hidden and layers must be positive".into());
        }
        if self.conv_channels < 1 || self.kernel_size < 1 || self.kernel_size % 2 == 0 {
            return bad("conv_channels must be positive and kernel_size odd".into());
        }
        let ts = self.target_scale;
        if !(ts.mean.is_finite() && ts.std.is_finite() && ts.std > 0.0) {
            return bad("the target scale must be finite with a positive std".into());
        }
        if self
            .scaler
            .min
            .iter()
            .chain(&self.scaler.max)
            .any(|v| !v.is_finite())
        {
            return bad("the scaler has non-finite values".into());
        }
        Ok(Encoder {
            encodings: self.features.iter().map(|f| encoding_of(f)).collect(),
            target,
            scaler: self.scaler.clone(),
            target_scale: self.target_scale,
        })
    }
}

/// The digest the registry records: covers the weights and meta.json.
pub fn digest(weights: &[u8], meta_json: &[u8]) -> String {
    sha256_hex(
        format!(
            "tickmesh-checkpoint-v1\n{}\n{}\n",
            sha256_hex(weights),
            sha256_hex(meta_json)
        )
        .as_bytes(),
    )
}

/// The weights of a var store as safetensors bytes.
pub fn weights_bytes(vs: &nn::VarStore) -> Result<Vec<u8>> {
    let dir = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let path = dir.path().join("model.safetensors");
    vs.save(&path)
        .map_err(|e| Error::invalid("checkpoint", format!("save weights: {e}")))?;
    std::fs::read(&path).map_err(|e| Error::io(&path, e))
}

/// Builds the model a meta.json describes and loads the weights into it.
pub fn load_model(
    meta: &Meta,
    weights: &[u8],
    device: tch::Device,
) -> Result<(nn::VarStore, Box<dyn SeqModel>)> {
    meta.encoder()?;
    let mut vs = nn::VarStore::new(device);
    let model = build(&vs.root(), &meta.arch());
    let dir = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, weights).map_err(|e| Error::io(&path, e))?;
    vs.load(&path).map_err(|e| {
        Error::invalid(
            "checkpoint",
            format!(
                "model.safetensors does not fit a {} model as meta.json describes it: {e}",
                meta.kind
            ),
        )
    })?;
    Ok((vs, model))
}

/// A checkpoint's files, encoded.
#[derive(Debug, Clone)]
pub struct Files {
    pub weights: Bytes,
    pub meta: Bytes,
    pub test: Bytes,
    /// [`digest`] of the weights and meta.json.
    pub digest: String,
}

fn to_json<T: Serialize + ?Sized>(v: &T) -> Result<Bytes> {
    serde_json::to_vec_pretty(v)
        .map(Bytes::from)
        .map_err(|e| Error::invalid("checkpoint", e.to_string()))
}

impl Files {
    pub fn new(meta: &Meta, weights: Vec<u8>, test: &[TestPoint]) -> Result<Self> {
        if sha256_hex(&weights) != meta.sha256 {
            return Err(Error::invalid(
                "checkpoint",
                "meta.sha256 does not match the weights",
            ));
        }
        let meta = to_json(meta)?;
        Ok(Files {
            digest: digest(&weights, &meta),
            weights: Bytes::from(weights),
            meta,
            test: to_json(test)?,
        })
    }

    fn named(&self) -> [(&'static str, &Bytes); 3] {
        // meta.json last: its presence marks a complete checkpoint.
        [
            ("model.safetensors", &self.weights),
            ("test.json", &self.test),
            ("meta.json", &self.meta),
        ]
    }
}

/// Where a checkpoint was published.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    pub uri: String,
    pub digest: String,
}

/// Stages a checkpoint under a temporary prefix, then publishes it as
/// `{ticker}/{interval}/v{version}/` (meta.json last).
pub async fn publish(
    store: &dyn ObjectStore,
    ticker: &str,
    interval: Interval,
    version: i64,
    files: &Files,
) -> Result<Published> {
    let prefix = model_prefix(ticker, interval, version);
    let staging = format!(
        "{ticker}/{interval}/.staging/v{version}-{:016x}",
        rand::random::<u64>()
    );
    for (name, data) in files.named() {
        store
            .put(buckets::MODELS, &format!("{staging}/{name}"), data.clone())
            .await?;
    }
    for (name, _) in files.named() {
        store
            .copy(
                buckets::MODELS,
                &format!("{staging}/{name}"),
                &format!("{prefix}/{name}"),
            )
            .await?;
    }
    for (name, _) in files.named() {
        let key = format!("{staging}/{name}");
        if let Err(e) = store.delete(buckets::MODELS, &key).await {
            warn!(%key, error = %e, "staged checkpoint file left behind");
        }
    }
    Ok(Published {
        uri: store.uri(buckets::MODELS, &prefix),
        digest: files.digest.clone(),
    })
}

/// Verifies a checkpoint's files: meta.json parses and describes a model,
/// the weights match meta.json's sha256, and, with `expected`, the digest of
/// both matches the registered one. The error names the file at fault.
pub fn verify(
    meta_json: &[u8],
    weights: &[u8],
    expected: Option<&str>,
    what: &str,
) -> Result<Meta> {
    let bad = |m: String| Error::invalid("checkpoint", format!("{what}: refused: {m}"));
    let meta: Meta = serde_json::from_slice(meta_json).map_err(|e| {
        bad(format!(
            "meta.json is not a valid checkpoint description: {e}"
        ))
    })?;
    let sha = sha256_hex(weights);
    if sha != meta.sha256 {
        return Err(bad(format!(
            "model.safetensors does not match meta.json (sha256 {sha}, meta.json says {}): the weights are corrupted or were replaced",
            meta.sha256
        )));
    }
    if let Some(want) = expected {
        let got = digest(weights, meta_json);
        if got != want {
            return Err(bad(format!(
                "meta.json does not match the registered checkpoint digest (got {got}, registered {want}): meta.json, or both files, differ from the checkpoint that was registered"
            )));
        }
    }
    meta.encoder().map_err(|e| bad(e.to_string()))?;
    Ok(meta)
}

/// Reads a published checkpoint and verifies it against the registry's digest.
pub async fn read(
    store: &dyn ObjectStore,
    ticker: &str,
    interval: Interval,
    version: i64,
    expected_digest: &str,
) -> Result<(Meta, Bytes)> {
    let prefix = model_prefix(ticker, interval, version);
    let get = |name: &'static str| {
        let key = format!("{prefix}/{name}");
        async move {
            store
                .get(buckets::MODELS, &key)
                .await?
                .ok_or_else(|| Error::NotFound(format!("{}/{key}", buckets::MODELS)))
        }
    };
    let meta_json = get("meta.json").await?;
    let weights = get("model.safetensors").await?;
    let what = format!("checkpoint {}/{prefix}", buckets::MODELS);
    let meta = verify(&meta_json, &weights, Some(expected_digest), &what)?;
    Ok((meta, weights))
}

/// Reads the test points of a published checkpoint (for charts).
pub async fn read_test_points(
    store: &dyn ObjectStore,
    ticker: &str,
    interval: Interval,
    version: i64,
) -> Result<Vec<TestPoint>> {
    let key = format!("{}/test.json", model_prefix(ticker, interval, version));
    let data = store
        .get(buckets::MODELS, &key)
        .await?
        .ok_or_else(|| Error::NotFound(format!("{}/{key}", buckets::MODELS)))?;
    serde_json::from_slice(&data).map_err(|e| Error::invalid("checkpoint", format!("{key}: {e}")))
}

/// Writes a checkpoint directory (the files plus `CHECKSUM`, the digest):
/// into a temporary sibling first, then renamed over `dir`.
pub fn write_dir(dir: &Path, files: &Files) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".checkpoint-")
        .tempdir_in(parent)
        .map_err(|e| Error::io(parent, e))?;
    for (name, data) in files.named() {
        let p = tmp.path().join(name);
        std::fs::write(&p, data).map_err(|e| Error::io(&p, e))?;
    }
    let p = tmp.path().join("CHECKSUM");
    std::fs::write(&p, format!("{}\n", files.digest)).map_err(|e| Error::io(&p, e))?;
    let tmp = tmp.keep();
    if dir.exists() {
        let old = parent.join(format!(".replaced-{:016x}", rand::random::<u64>()));
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}

/// Reads and verifies a checkpoint directory.
pub fn read_dir(dir: &Path) -> Result<(Meta, Bytes)> {
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read(&p).map_err(|e| {
            Error::invalid(
                "checkpoint",
                format!("{}: cannot read {name}: {e}", dir.display()),
            )
        })
    };
    let checksum = String::from_utf8_lossy(&read("CHECKSUM")?)
        .trim()
        .to_string();
    let meta_json = read("meta.json")?;
    let weights = read("model.safetensors")?;
    let meta = verify(
        &meta_json,
        &weights,
        Some(&checksum),
        &dir.display().to_string(),
    )?;
    Ok((meta, Bytes::from(weights)))
}
