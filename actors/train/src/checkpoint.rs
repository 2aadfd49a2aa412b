//! Checkpoints in the object store, bucket `models`:
//! `{ticker}/{interval}/v{N}/model.safetensors`, `validation.json`, then
//! `meta.json` last (a checkpoint without meta.json is incomplete and never
//! served). meta.json carries the sha256 of the weights; a checkpoint whose
//! weights do not match it is refused.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tch::nn;
use tickmesh_core::config::TrainConfig;
use tickmesh_core::store::{buckets, sha256_hex, ObjectStore};
use tickmesh_core::types::{model_prefix, Interval};
use tickmesh_core::{Error, Result};

use crate::dataset::{MinMaxScaler, TargetScale};
use crate::fit::{EvalReport, ValidationPoint};
use crate::model::LstmAttention;

/// The span of data a model was trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataRange {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub rows: usize,
}

/// `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub kind: String,
    pub ticker: String,
    pub interval: Interval,
    pub version: i64,
    pub features: Vec<String>,
    /// `log_return`: the model predicts the standardized next log return.
    pub target: String,
    pub target_scale: TargetScale,
    pub seq_len: usize,
    pub hidden: i64,
    pub layers: i64,
    /// Fitted on the training split only.
    pub scaler: MinMaxScaler,
    pub hyperparameters: TrainConfig,
    pub metrics: EvalReport,
    pub data: DataRange,
    pub epochs_run: usize,
    pub best_epoch: usize,
    /// sha256 of model.safetensors.
    pub sha256: String,
    pub device: String,
    pub trained_at: DateTime<Utc>,
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
) -> Result<(nn::VarStore, LstmAttention)> {
    if meta.kind != "lstm_attention" {
        return Err(Error::invalid(
            "checkpoint",
            format!("unknown model kind `{}`", meta.kind),
        ));
    }
    let mut vs = nn::VarStore::new(device);
    let model = LstmAttention::new(
        &vs.root(),
        meta.features.len() as i64,
        meta.hidden,
        meta.layers,
    );
    let dir = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, weights).map_err(|e| Error::io(&path, e))?;
    vs.load(&path)
        .map_err(|e| Error::invalid("checkpoint", format!("load weights: {e}")))?;
    Ok((vs, model))
}

/// Writes a checkpoint (meta.json last); returns its URI.
pub async fn write(
    store: &dyn ObjectStore,
    meta: &Meta,
    weights: Vec<u8>,
    validation: &[ValidationPoint],
) -> Result<String> {
    let prefix = model_prefix(&meta.ticker, meta.interval, meta.version);
    if sha256_hex(&weights) != meta.sha256 {
        return Err(Error::invalid(
            "checkpoint",
            "meta.sha256 does not match the weights",
        ));
    }
    store
        .put(
            buckets::MODELS,
            &format!("{prefix}/model.safetensors"),
            Bytes::from(weights),
        )
        .await?;
    store
        .put(
            buckets::MODELS,
            &format!("{prefix}/validation.json"),
            to_json(&validation)?,
        )
        .await?;
    store
        .put(
            buckets::MODELS,
            &format!("{prefix}/meta.json"),
            to_json(meta)?,
        )
        .await?;
    Ok(store.uri(buckets::MODELS, &prefix))
}

fn to_json<T: Serialize + ?Sized>(v: &T) -> Result<Bytes> {
    serde_json::to_vec_pretty(v)
        .map(Bytes::from)
        .map_err(|e| Error::invalid("checkpoint", e.to_string()))
}

/// Reads a checkpoint and verifies it: meta.json present, weights present
/// and matching both meta.sha256 and `expected_sha256` (from the registry).
pub async fn read(
    store: &dyn ObjectStore,
    ticker: &str,
    interval: Interval,
    version: i64,
    expected_sha256: &str,
) -> Result<(Meta, Bytes)> {
    let prefix = model_prefix(ticker, interval, version);
    let meta = store
        .get(buckets::MODELS, &format!("{prefix}/meta.json"))
        .await?
        .ok_or_else(|| Error::NotFound(format!("{}/{prefix}/meta.json", buckets::MODELS)))?;
    let meta: Meta = serde_json::from_slice(&meta)
        .map_err(|e| Error::invalid("checkpoint", format!("{prefix}/meta.json: {e}")))?;
    let weights = store
        .get(buckets::MODELS, &format!("{prefix}/model.safetensors"))
        .await?
        .ok_or_else(|| {
            Error::NotFound(format!("{}/{prefix}/model.safetensors", buckets::MODELS))
        })?;
    let sha = sha256_hex(&weights);
    if sha != meta.sha256 || sha != expected_sha256 {
        return Err(Error::invalid(
            "checkpoint",
            format!(
                "{prefix}: weights sha256 {sha} does not match meta {} / registry {expected_sha256}",
                meta.sha256
            ),
        ));
    }
    Ok((meta, weights))
}

/// Reads the validation points of a checkpoint (for charts).
pub async fn read_validation(
    store: &dyn ObjectStore,
    ticker: &str,
    interval: Interval,
    version: i64,
) -> Result<Vec<ValidationPoint>> {
    let key = format!(
        "{}/validation.json",
        model_prefix(ticker, interval, version)
    );
    let data = store
        .get(buckets::MODELS, &key)
        .await?
        .ok_or_else(|| Error::NotFound(format!("{}/{key}", buckets::MODELS)))?;
    serde_json::from_slice(&data).map_err(|e| Error::invalid("checkpoint", format!("{key}: {e}")))
}
