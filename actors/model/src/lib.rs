//! tickmesh-model: everything about a model that both the train and the
//! serve roles need. Links libtorch (through tch).
//!
//! - [`arch`]: the model kinds behind one trait ([`arch::SeqModel`]):
//!   `lstm_attention` (the default), `gru`, `cnn_lstm`, with PyTorch's
//!   parameter names and layouts, and a seeded initialisation.
//! - [`dataset`]: feature rows → windows; the chronological
//!   train/validation/test split; the scalers (fitted on the training split).
//! - [`metrics`]: MAE, MSE, RMSE, MAPE and directional accuracy, beside the
//!   naive persistence forecast.
//! - [`fit`]: Adam with gradient clipping and early stopping on validation.
//! - [`fused`]: many models of one kind and shape trained as one batched
//!   computation, each ending exactly as it would alone.
//! - [`checkpoint`]: `model.safetensors` + `meta.json` + `test.json`, staged
//!   under temporary keys and published complete; the registry digest covers
//!   the weights and meta.json.
//! - [`forecast`]: recursive multi-step forecasts from the stored feature
//!   rows and the indicator state at the last stored bar.
//! - [`native`]: the forward pass of every kind in plain Rust, which
//!   forecasts run (one window at a time, libtorch's dispatch would cost
//!   more than the arithmetic).

pub mod arch;
pub mod checkpoint;
pub mod dataset;
pub mod fit;
pub mod forecast;
pub mod fused;
mod fused_attn;
mod fused_cpu;
pub mod metrics;
pub mod native;

pub use tickmesh_core::config::ModelKind;

/// Picks the libtorch device for a `train.device` setting.
pub fn device(setting: &str) -> tch::Device {
    match setting {
        "cpu" => tch::Device::Cpu,
        "cuda" => tch::Device::Cuda(0),
        s => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => tch::Device::Cuda(n),
            None => tch::Device::cuda_if_available(),
        },
    }
}

/// A short name of a device for logs and meta.json.
pub fn device_name(d: tch::Device) -> String {
    match d {
        tch::Device::Cpu => "cpu".into(),
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}
