//! tickmesh-train: the train role. Links libtorch (through tch).
//!
//! - [`model`]: LSTM with additive attention over the window.
//! - [`dataset`]: windows, the min-max scaler (fitted on the training split only).
//! - [`fit`]: training with early stopping, metrics beside the naive forecast.
//! - [`checkpoint`]: `model.safetensors` + `meta.json` (+ `validation.json`) in the store.
//! - [`forecast`]: recursive multi-step forecasts from a checkpoint.
//! - [`trainer`]: `TrainerActor`, one job at a time on a blocking thread.
//! - [`pool`]: `TrainerPool`, the node agent: registers with the coordinator,
//!   takes assignments, runs trainers, reports checkpoints.

pub mod checkpoint;
pub mod dataset;
pub mod fit;
pub mod forecast;
pub mod model;
pub mod pool;
pub mod trainer;

/// Picks the libtorch device for a `train.device` setting.
pub fn device(setting: &str) -> tch::Device {
    match setting {
        "cpu" => tch::Device::Cpu,
        "cuda" => tch::Device::Cuda(0),
        _ => tch::Device::cuda_if_available(),
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
