//! The model kinds, behind one trait. Input `x: [batch, seq_len, features]`
//! (batch first), output `[batch]`: the standardized next log return.
//!
//! - `lstm_attention`: LSTM → hidden states `h` → scores
//!   `attn_v(tanh(attn_w(h)))` → softmax over time → context `Σ α_t h_t` →
//!   `out`.
//! - `gru`: GRU → the last hidden state → `out`.
//! - `cnn_lstm`: `conv` (Conv1d over time, `kernel_size` odd, padded to keep
//!   the length) → ReLU → LSTM → the last hidden state → `out`.
//!
//! Parameter names and layouts are PyTorch's (`lstm.weight_ih_l0`,
//! `gru.bias_hh_l0`, `conv.weight` `[C, F, K]`, `attn_w.weight`, `out.bias`,
//! …), so a checkpoint's safetensors load with `load_state_dict(strict=True)`
//! into the `torch.nn` modules of `scripts/py/tickmesh_torch.py`; the parity
//! test checks the outputs agree.

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, RNN};
use tch::Tensor;
use tickmesh_core::config::{ModelKind, TrainConfig};

/// Everything needed to rebuild a model's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arch {
    pub kind: ModelKind,
    pub features: i64,
    pub hidden: i64,
    pub layers: i64,
    pub conv_channels: i64,
    pub kernel_size: i64,
}

impl Arch {
    pub fn of(cfg: &TrainConfig, features: usize) -> Self {
        Arch {
            kind: cfg.model,
            features: features as i64,
            hidden: cfg.hidden,
            layers: cfg.layers,
            conv_channels: cfg.conv_channels,
            kernel_size: cfg.kernel_size,
        }
    }
}

/// A sequence model: a window of encoded features in, a prediction out.
pub trait SeqModel: Send + std::fmt::Debug {
    /// `[batch, seq_len, features]` → `[batch]`.
    fn forward(&self, x: &Tensor) -> Tensor;
}

fn rnn_config(layers: i64) -> nn::RNNConfig {
    nn::RNNConfig {
        batch_first: true,
        num_layers: layers,
        ..Default::default()
    }
}

fn linear(p: nn::Path, i: i64, o: i64, bias: bool) -> nn::Linear {
    nn::linear(
        p,
        i,
        o,
        nn::LinearConfig {
            bias,
            ..Default::default()
        },
    )
}

#[derive(Debug)]
struct LstmAttention {
    lstm: nn::LSTM,
    attn_w: nn::Linear,
    attn_v: nn::Linear,
    out: nn::Linear,
}

impl SeqModel for LstmAttention {
    fn forward(&self, x: &Tensor) -> Tensor {
        let (h, _) = self.lstm.seq(x);
        let scores = self.attn_v.forward(&self.attn_w.forward(&h).tanh());
        let alpha = scores.softmax(1, tch::Kind::Float);
        let context = (&alpha * &h).sum_dim_intlist(1, false, tch::Kind::Float);
        self.out.forward(&context).squeeze_dim(-1)
    }
}

#[derive(Debug)]
struct Gru {
    gru: nn::GRU,
    out: nn::Linear,
}

impl SeqModel for Gru {
    fn forward(&self, x: &Tensor) -> Tensor {
        let (h, _) = self.gru.seq(x);
        self.out.forward(&h.select(1, -1)).squeeze_dim(-1)
    }
}

#[derive(Debug)]
struct CnnLstm {
    conv: nn::Conv1D,
    lstm: nn::LSTM,
    out: nn::Linear,
}

impl SeqModel for CnnLstm {
    fn forward(&self, x: &Tensor) -> Tensor {
        let z = self.conv.forward(&x.transpose(1, 2)).relu().transpose(1, 2);
        let (h, _) = self.lstm.seq(&z);
        self.out.forward(&h.select(1, -1)).squeeze_dim(-1)
    }
}

/// Builds a model's parameters under `p` (values: see [`init_seeded`]).
pub fn build(p: &nn::Path, a: &Arch) -> Box<dyn SeqModel> {
    let (f, h) = (a.features, a.hidden);
    let out = linear(p / "out", h, 1, true);
    match a.kind {
        ModelKind::LstmAttention => Box::new(LstmAttention {
            lstm: nn::lstm(p / "lstm", f, h, rnn_config(a.layers)),
            attn_w: linear(p / "attn_w", h, h, true),
            attn_v: linear(p / "attn_v", h, 1, false),
            out,
        }),
        ModelKind::Gru => Box::new(Gru {
            gru: nn::gru(p / "gru", f, h, rnn_config(a.layers)),
            out,
        }),
        ModelKind::CnnLstm => Box::new(CnnLstm {
            conv: nn::conv1d(
                p / "conv",
                f,
                a.conv_channels,
                a.kernel_size,
                nn::ConvConfig {
                    padding: a.kernel_size / 2,
                    ..Default::default()
                },
            ),
            lstm: nn::lstm(p / "lstm", a.conv_channels, h, rnn_config(a.layers)),
            out,
        }),
    }
}

/// Sets every parameter from a generator seeded with `seed`, with PyTorch's
/// default distributions: recurrent weights and biases `U(±1/√hidden)`,
/// linear and convolution weights and biases `U(±1/√fan_in)`. The output
/// layer is the exception: weights `U(±1e-3)` and a zero bias, so the
/// untrained model predicts about the training mean return (the naive
/// forecast) and training moves away from it only where that helps.
///
/// It draws from its own generator, never libtorch's process-global one, so
/// trainers running at once in one process stay reproducible.
pub fn init_seeded(vs: &nn::VarStore, a: &Arch, seed: i64) {
    let vars = vs.variables();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed as u64);
    let fan_in = |name: &str| -> f64 {
        let prefix = name.rsplit_once('.').map_or("", |(p, _)| p);
        let w = &vars[&format!("{prefix}.weight")];
        w.size().iter().skip(1).product::<i64>() as f64
    };
    tch::no_grad(|| {
        for name in names {
            let t = &vars[name];
            let bound = if name == "out.weight" {
                1e-3
            } else if name == "out.bias" {
                0.0
            } else if name.starts_with("lstm.") || name.starts_with("gru.") {
                1.0 / (a.hidden as f64).sqrt()
            } else {
                1.0 / fan_in(name).sqrt()
            };
            let values: Vec<f32> = (0..t.numel())
                .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
                .collect();
            let mut t = t.shallow_clone();
            t.copy_(
                &Tensor::from_slice(&values)
                    .reshape(t.size())
                    .to_device(t.device()),
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arch(kind: ModelKind) -> Arch {
        Arch {
            kind,
            features: 4,
            hidden: 8,
            layers: 1,
            conv_channels: 6,
            kernel_size: 3,
        }
    }

    #[test]
    fn parameter_names_are_pytorchs() {
        let names = |kind| {
            let vs = nn::VarStore::new(tch::Device::Cpu);
            let _m = build(&vs.root(), &arch(kind));
            let mut v: Vec<(String, Vec<i64>)> = vs
                .variables()
                .into_iter()
                .map(|(k, t)| (k, t.size()))
                .collect();
            v.sort();
            v
        };
        let rnn = |p: &str, gates: i64, input: i64| {
            vec![
                (format!("{p}.bias_hh_l0"), vec![gates * 8]),
                (format!("{p}.bias_ih_l0"), vec![gates * 8]),
                (format!("{p}.weight_hh_l0"), vec![gates * 8, 8]),
                (format!("{p}.weight_ih_l0"), vec![gates * 8, input]),
            ]
        };
        let out = vec![
            ("out.bias".to_string(), vec![1]),
            ("out.weight".to_string(), vec![1, 8]),
        ];
        let mut want = vec![
            ("attn_v.weight".to_string(), vec![1, 8]),
            ("attn_w.bias".to_string(), vec![8]),
            ("attn_w.weight".to_string(), vec![8, 8]),
        ];
        want.extend(rnn("lstm", 4, 4));
        want.extend(out.clone());
        assert_eq!(names(ModelKind::LstmAttention), want);
        let mut want = rnn("gru", 3, 4);
        want.extend(out.clone());
        assert_eq!(names(ModelKind::Gru), want);
        let mut want = vec![
            ("conv.bias".to_string(), vec![6]),
            ("conv.weight".to_string(), vec![6, 4, 3]),
        ];
        want.extend(rnn("lstm", 4, 6));
        want.extend(out);
        assert_eq!(names(ModelKind::CnnLstm), want);
    }

    #[test]
    fn every_kind_maps_a_window_to_one_value_and_init_is_seeded() {
        for kind in ModelKind::ALL {
            let a = arch(kind);
            let run = |seed| {
                let vs = nn::VarStore::new(tch::Device::Cpu);
                let m = build(&vs.root(), &a);
                init_seeded(&vs, &a, seed);
                let x = Tensor::arange(3 * 5 * 4, (tch::Kind::Float, tch::Device::Cpu))
                    .reshape([3, 5, 4])
                    / 60.0;
                Vec::<f32>::try_from(m.forward(&x)).unwrap()
            };
            let (a1, a2, b) = (run(7), run(7), run(8));
            assert_eq!(a1.len(), 3, "{kind}");
            assert_eq!(a1, a2, "{kind}: same seed, same model");
            assert_ne!(a1, b, "{kind}: another seed, another model");
        }
    }
}
