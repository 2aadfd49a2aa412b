//! LSTM with additive attention over the input window (the default model).
//!
//! `x: [batch, seq_len, features]` → LSTM (batch-first) → hidden states
//! `h: [batch, seq_len, hidden]` → scores `v · tanh(W h_t)` → softmax over
//! time → context `Σ α_t h_t` → linear → the next (scaled) close, `[batch]`.
//! Parameter names follow PyTorch's (`lstm.weight_ih_l0`, `attn_w.weight`, …)
//! so a PyTorch module of the same shape loads the same safetensors.

use tch::nn::{self, Module, RNN};
use tch::Tensor;

#[derive(Debug)]
pub struct LstmAttention {
    lstm: nn::LSTM,
    attn_w: nn::Linear,
    attn_v: nn::Linear,
    out: nn::Linear,
}

impl LstmAttention {
    pub fn new(p: &nn::Path, features: i64, hidden: i64, layers: i64) -> Self {
        let cfg = nn::RNNConfig {
            batch_first: true,
            num_layers: layers,
            ..Default::default()
        };
        LstmAttention {
            lstm: nn::lstm(p / "lstm", features, hidden, cfg),
            attn_w: nn::linear(p / "attn_w", hidden, hidden, Default::default()),
            attn_v: nn::linear(
                p / "attn_v",
                hidden,
                1,
                nn::LinearConfig {
                    bias: false,
                    ..Default::default()
                },
            ),
            // Starts at "the training mean return" (about the naive forecast):
            // zero bias, small weights; training moves away only where it helps.
            out: nn::linear(
                p / "out",
                hidden,
                1,
                nn::LinearConfig {
                    ws_init: nn::Init::Uniform {
                        lo: -1e-3,
                        up: 1e-3,
                    },
                    bs_init: Some(nn::Init::Const(0.0)),
                    bias: true,
                },
            ),
        }
    }

    /// The attention weights and the prediction of a batch.
    pub fn forward_with_attention(&self, x: &Tensor) -> (Tensor, Tensor) {
        let (h, _) = self.lstm.seq(x);
        let scores = self.attn_v.forward(&self.attn_w.forward(&h).tanh());
        let alpha = scores.softmax(1, tch::Kind::Float);
        let context = (&alpha * &h).sum_dim_intlist(1, false, tch::Kind::Float);
        (
            self.out.forward(&context).squeeze_dim(-1),
            alpha.squeeze_dim(-1),
        )
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_with_attention(x).0
    }
}
