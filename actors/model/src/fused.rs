//! Fused training: G models of one kind and shape, each with its own data,
//! trained as one computation. Every parameter gets a leading group
//! dimension (all of a model's parameters are views into one row of a flat
//! `[G, P]` tensor), each time step is one batched matrix product for all
//! groups, and Adam, gradient clipping, the losses and the metrics act on
//! whole `[G, …]` tensors.
//!
//! Each group is the fit [`crate::fit::fit_with`] would run alone, step for
//! step: the same seeded initialisation (or warm start), the same
//! per-epoch shuffle of its own windows, the same minibatches, its own
//! Adam state and bias correction, its own gradient-norm clip, its own
//! early stopping with its own best weights. Groups with fewer windows run
//! out of minibatches first: their later steps are masked (no gradient, no
//! Adam step, no moment decay). A group whose patience ran out, whose loss
//! diverged or whose hooks failed (a lost lease) leaves the computation at
//! the end of the epoch; the others go on unchanged. The tests in
//! `tests/fused.rs` check the weights against one-at-a-time fits to 1e-5.
//!
//! The per-step work stays on the device: the minibatch indices, masks and
//! Adam's per-group step sizes of a whole epoch are uploaded once, and the
//! host reads the losses once per epoch. On a CUDA device everything runs
//! through libtorch's operators and autograd (CUDA graphs are not used:
//! tch 0.24 has no binding for `at::cuda::CUDAGraph`).
//!
//! On the CPU two things differ, both measured (`scripts/bench/fused.sh`):
//! - for the kinds with an LSTM (`lstm_attention`, `cnn_lstm`) a training
//!   step runs by hand, without autograd: the recurrence in
//!   [`crate::fused_cpu`] (one kernel per step each way, products and cell
//!   together), the attention head in [`crate::fused_attn`], the output
//!   layer and the loss's gradient as a few operators; only `cnn_lstm`'s
//!   convolution stays on autograd;
//! - a group is split into one shard per intra-op thread, each a fused
//!   computation on its own thread with libtorch's threads at 1 there
//!   (its OpenMP workers spin between small operators and take the cores).

use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::nn;
use tch::{Device, Kind, Tensor};
use tickmesh_core::config::{ModelKind, TrainConfig};
use tickmesh_core::{Error, Result};

use crate::arch::{build, init_seeded, Arch};
use crate::dataset::Dataset;
use crate::fit::{
    evaluate, fingerprint, named, set_initial_weights, EpochProgress, FitHooks, Fitted, Snapshot,
    SnapshotState,
};

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;
/// Windows per group in one validation forward pass.
const VAL_CHUNK: usize = 512;

/// Estimated memory of one member while it trains fused, in bytes: its
/// windows (training and validation), a minibatch's activations kept for
/// the backward pass, a validation chunk's, and its weights with their
/// gradient, best copy and Adam's moments.
pub fn member_bytes(ds: &Dataset, cfg: &TrainConfig) -> u64 {
    let (t, f, h) = (
        cfg.seq_len as u64,
        ds.n_features() as u64,
        cfg.hidden.max(1) as u64,
    );
    let layers = cfg.layers.max(1) as u64;
    let windows = (ds.splits.train.len() + ds.splits.validation.len()) as u64 * (t * f + 1) * 4;
    // Per window and time step: gates, cell and hidden states, their
    // activations, the attention's and the convolution's outputs.
    let per_window = t * (layers * 12 * h + 2 * f.max(cfg.conv_channels as u64)) * 4;
    let activations = (3 * cfg.batch_size as u64 + VAL_CHUNK as u64) * per_window;
    let params =
        5 * 4 * layers * (4 * h * (f.max(cfg.conv_channels as u64) + h + 2) + h * h + 2 * h);
    windows + activations + params
}

/// One model of a fused group: its data and its hooks (progress, lease
/// checks, snapshots, a warm start).
pub struct Member<'a> {
    pub ds: Dataset,
    pub hooks: &'a mut (dyn FitHooks + Send),
}

/// Where each parameter lives in a row of the flat `[G, P]` tensor.
#[derive(Debug, Clone)]
struct Layout {
    /// `(name, shape, offset)`, names sorted.
    params: Vec<(String, Vec<i64>, i64)>,
}

impl Layout {
    fn of(vs: &nn::VarStore) -> Self {
        let mut off = 0;
        let params = named(vs)
            .into_iter()
            .map(|(n, t)| {
                let shape = t.size();
                let o = off;
                off += shape.iter().product::<i64>();
                (n, shape, o)
            })
            .collect();
        Layout { params }
    }

    /// A model's parameters as one row `[P]`.
    fn flatten(&self, vs: &nn::VarStore) -> Tensor {
        let vars = vs.variables();
        let parts: Vec<Tensor> = self
            .params
            .iter()
            .map(|(n, _, _)| vars[n].detach().reshape([-1]))
            .collect();
        Tensor::cat(&parts, 0)
    }

    /// Row `row` of `[G, P]` into a model's parameters.
    fn unflatten_into(&self, flat: &Tensor, vs: &nn::VarStore) {
        let vars = vs.variables();
        tch::no_grad(|| {
            for (n, shape, off) in &self.params {
                let n_el: i64 = shape.iter().product();
                vars[n]
                    .shallow_clone()
                    .copy_(&flat.narrow(0, *off, n_el).reshape(shape.as_slice()));
            }
        })
    }

    /// Named views `[G, shape…]` of `w` `[G, P]`.
    fn views(&self, w: &Tensor) -> Params {
        Params(
            self.params
                .iter()
                .map(|(n, shape, off)| (n.clone(), group_view(w, shape, *off)))
                .collect(),
        )
    }

    /// The part of a `[G, P]` gradient that is parameter `name`, shaped
    /// `[G, shape…]` (a view: writing it writes the gradient).
    fn grad_of(&self, grad: &Tensor, name: &str) -> Tensor {
        let (_, shape, off) = self
            .params
            .iter()
            .find(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("the layout has `{name}`"));
        group_view(grad, shape, *off)
    }

    /// `(name, row of t)` per parameter, shaped as the model's.
    fn named_row(&self, t: &Tensor, prefix: &str) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(n, shape, off)| {
                let n_el: i64 = shape.iter().product();
                (
                    format!("{prefix}.{n}"),
                    t.narrow(0, *off, n_el).reshape(shape.as_slice()).copy(),
                )
            })
            .collect()
    }
}

/// The parameter at `off` with `shape` in every row of `t` `[G, P]`, as a
/// view `[G, shape…]`.
fn group_view(t: &Tensor, shape: &[i64], off: i64) -> Tensor {
    let mut s = vec![t.size()[0]];
    s.extend(shape);
    t.narrow(1, off, shape.iter().product()).view(s.as_slice())
}

struct Params(Vec<(String, Tensor)>);

impl Params {
    fn get(&self, name: &str) -> &Tensor {
        &self
            .0
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("the layout has `{name}`"))
            .1
    }
}

/// `x` `[G, R, I]` times each group's `w` `[G, O, I]` transposed, plus `b`
/// `[G, O]`: a linear layer per group, `[G, R, O]`.
fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    let y = x.bmm(&w.transpose(1, 2));
    match b {
        Some(b) => y + b.unsqueeze(1),
        None => y,
    }
}

/// One LSTM layer over `x` `[G, T, B, I]` → `[G, T, B, H]` (gates i, f, g,
/// o as PyTorch's).
fn lstm_layer(x: &Tensor, p: &Params, prefix: &str, layer: usize, h: i64) -> Tensor {
    let [g, t, b, i] = x.size()[..] else {
        unreachable!("x is [G, T, B, I]")
    };
    let w_ih = p.get(&format!("{prefix}.weight_ih_l{layer}"));
    let w_hh = p.get(&format!("{prefix}.weight_hh_l{layer}"));
    let bias =
        p.get(&format!("{prefix}.bias_ih_l{layer}")) + p.get(&format!("{prefix}.bias_hh_l{layer}"));
    let xp = linear(&x.reshape([g, t * b, i]), w_ih, Some(&bias)).view([g, t, b, 4 * h]);
    // Contiguous once, not copied by every step's product.
    let w_hh_t = w_hh.transpose(1, 2).contiguous();
    let mut hs = Tensor::zeros([g, b, h], (Kind::Float, x.device()));
    let mut c = Tensor::zeros([g, b, h], (Kind::Float, x.device()));
    let mut out = Vec::with_capacity(t as usize);
    // unbind and chunk, not select and narrow: their backward passes are
    // one stack or cat, not a zero-filled copy of the whole input per slice.
    for xk in xp.unbind(1) {
        let gates = xk.baddbmm(&hs, &w_hh_t, 1, 1).chunk(4, 2);
        let ig = gates[0].sigmoid();
        let fg = gates[1].sigmoid();
        let gg = gates[2].tanh();
        let og = gates[3].sigmoid();
        c = fg * &c + ig * gg;
        hs = og * c.tanh();
        out.push(hs.shallow_clone());
    }
    Tensor::stack(&out, 1)
}

/// One GRU layer over `x` `[G, T, B, I]` → `[G, T, B, H]` (gates r, z, n
/// as PyTorch's).
fn gru_layer(x: &Tensor, p: &Params, layer: usize, h: i64) -> Tensor {
    let [g, t, b, i] = x.size()[..] else {
        unreachable!("x is [G, T, B, I]")
    };
    let w_ih = p.get(&format!("gru.weight_ih_l{layer}"));
    let w_hh = p.get(&format!("gru.weight_hh_l{layer}"));
    let b_ih = p.get(&format!("gru.bias_ih_l{layer}"));
    let b_hh = p.get(&format!("gru.bias_hh_l{layer}")).unsqueeze(1);
    let xp = linear(&x.reshape([g, t * b, i]), w_ih, Some(b_ih)).view([g, t, b, 3 * h]);
    let w_hh_t = w_hh.transpose(1, 2).contiguous();
    let mut hs = Tensor::zeros([g, b, h], (Kind::Float, x.device()));
    let mut out = Vec::with_capacity(t as usize);
    for xk in xp.unbind(1) {
        let gi = xk.chunk(3, 2);
        let gh = b_hh.baddbmm(&hs, &w_hh_t, 1, 1).chunk(3, 2);
        let r = (&gi[0] + &gh[0]).sigmoid();
        let z = (&gi[1] + &gh[1]).sigmoid();
        let n = (&gi[2] + r * &gh[2]).tanh();
        hs = &n + z * (&hs - &n);
        out.push(hs.shallow_clone());
    }
    Tensor::stack(&out, 1)
}

/// The output layer on each group's last state `[G, B, H]` → `[G, B]`.
fn out_layer(p: &Params, last: &Tensor) -> Tensor {
    linear(last, p.get("out.weight"), Some(p.get("out.bias"))).squeeze_dim(-1)
}

/// Attention over the LSTM's states `s` `[G, T, B, H]`, then the output
/// layer: `[G, B]`.
fn attention_head(p: &Params, s: &Tensor) -> Tensor {
    let [g, t, b, h] = s.size()[..] else {
        unreachable!("s is [G, T, B, H]")
    };
    // Batch-major as the lone model's `[B, T, H]`: the attention's
    // reductions then add in the same order (its bias has a small gradient
    // whose rounding Adam's normalisation would amplify).
    let s = s.transpose(1, 2).contiguous();
    let flat = s.view([g, b * t, h]);
    let hidden = p
        .get("attn_w.bias")
        .unsqueeze(1)
        .baddbmm(&flat, &p.get("attn_w.weight").transpose(1, 2), 1, 1)
        .tanh();
    let scores = linear(&hidden, p.get("attn_v.weight"), None).view([g, b, t, 1]);
    let alpha = scores.softmax(2, Kind::Float);
    let context = (alpha * s).sum_dim_intlist(2, false, Kind::Float);
    out_layer(p, &context)
}

/// `cnn_lstm`'s convolution and ReLU over `x` `[G, B, T, F]` → `[G, T, B, C]`.
fn conv_input(a: &Arch, p: &Params, x: &Tensor) -> Tensor {
    let [g, b, t, f] = x.size()[..] else {
        unreachable!("x is [G, B, T, F]")
    };
    let c = a.conv_channels;
    // A grouped convolution: group k convolves its own F channels with its
    // own C filters.
    let input = x.permute([1, 0, 3, 2]).reshape([b, g * f, t]);
    let w = p.get("conv.weight").reshape([g * c, f, a.kernel_size]);
    let bias = p.get("conv.bias").reshape([g * c]);
    input
        .conv1d(&w, Some(&bias), [1], [a.kernel_size / 2], [1], g)
        .view([b, g, c, t])
        .permute([1, 3, 0, 2])
        .relu()
        .contiguous()
}

/// The fused forward pass: `x` `[G, B, T, F]` → `[G, B]`.
fn forward(a: &Arch, p: &Params, x: &Tensor) -> Tensor {
    let t = x.size()[2];
    let h = a.hidden;
    match a.kind {
        ModelKind::LstmAttention => {
            let mut s = x.transpose(1, 2).contiguous();
            for l in 0..a.layers as usize {
                s = lstm_layer(&s, p, "lstm", l, h);
            }
            attention_head(p, &s)
        }
        ModelKind::Gru => {
            let mut s = x.transpose(1, 2).contiguous();
            for l in 0..a.layers as usize {
                s = gru_layer(&s, p, l, h);
            }
            out_layer(p, &s.select(1, t - 1))
        }
        ModelKind::CnnLstm => {
            let mut s = conv_input(a, p, x);
            for l in 0..a.layers as usize {
                s = lstm_layer(&s, p, "lstm", l, h);
            }
            out_layer(p, &s.select(1, t - 1))
        }
    }
}

/// Whether the training steps run the LSTM recurrence by hand
/// ([`crate::fused_cpu`]): on the CPU, for the kinds with an LSTM.
fn native_recurrence(a: &Arch, device: Device) -> bool {
    device == Device::Cpu && matches!(a.kind, ModelKind::LstmAttention | ModelKind::CnnLstm)
}

/// The forward pass with the LSTM recurrence by hand (no gradients), for
/// validation; `tapes` lends its buffers from one call to the next.
fn native_forward(
    a: &Arch,
    p: &Params,
    x: &Tensor,
    tapes: &mut Vec<crate::fused_cpu::Tape>,
) -> Tensor {
    let t = x.size()[2];
    let mut s = match a.kind {
        ModelKind::CnnLstm => conv_input(a, p, x),
        _ => x.transpose(1, 2).contiguous(),
    };
    let mut reuse: Vec<Option<crate::fused_cpu::Tape>> = tapes.drain(..).map(Some).collect();
    reuse.resize_with(a.layers as usize, || None);
    for (l, old) in reuse.into_iter().enumerate() {
        let name = |k: &str| format!("lstm.{k}_l{l}");
        let (out, tape) = crate::fused_cpu::forward(
            &s,
            p.get(&name("weight_ih")),
            p.get(&name("weight_hh")),
            p.get(&name("bias_ih")),
            p.get(&name("bias_hh")),
            old,
        );
        tapes.push(tape);
        s = out;
    }
    match a.kind {
        ModelKind::LstmAttention => {
            let hp = head_params(p);
            crate::fused_attn::forward(&s, &head_view(&hp)).0
        }
        _ => out_layer(p, &s.select(1, t - 1)),
    }
}

/// A minibatch's targets: `y` and `mask` `[G, B]`, `len` `[G]` (the
/// group's real samples).
struct Target<'a> {
    y: &'a Tensor,
    mask: &'a Tensor,
    len: &'a Tensor,
}

impl Target<'_> {
    /// Each group's mean squared error over its own samples, `[G]`.
    fn loss(&self, pred: &Tensor) -> Tensor {
        ((pred - self.y).square() * self.mask).sum_dim_intlist(1, false, Kind::Float)
            / self.len.clamp_min(1.0)
    }

    /// The gradient of the summed [`Target::loss`] in the predictions.
    fn dpred(&self, pred: &Tensor) -> Tensor {
        (pred - self.y) * self.mask * 2.0 / self.len.clamp_min(1.0).unsqueeze(1)
    }
}

/// The head's parameters of `lstm_attention`, contiguous.
fn head_params(p: &Params) -> [Tensor; 5] {
    [
        "attn_w.weight",
        "attn_w.bias",
        "attn_v.weight",
        "out.weight",
        "out.bias",
    ]
    .map(|n| p.get(n).contiguous())
}

fn head_view(t: &[Tensor; 5]) -> crate::fused_attn::HeadParams<'_> {
    crate::fused_attn::HeadParams {
        w_a: &t[0],
        b_a: &t[1],
        v: &t[2],
        w_o: &t[3],
        b_o: &t[4],
    }
}

/// Groups per pass of the native (CPU) forward and backward: one group's
/// activations, about a megabyte at the models' sizes, stay in the core's
/// cache from the forward to the backward. All of a shard's groups at once
/// went through memory and ran 30% slower (`bench-fused --group 2`, one
/// group per shard, against `--group 30`).
const NATIVE_CHUNK: i64 = 1;

/// `(first, count)` of each pass of [`NATIVE_CHUNK`] groups over `g`.
fn chunks(g: i64) -> impl Iterator<Item = (i64, i64)> {
    (0..g)
        .step_by(NATIVE_CHUNK as usize)
        .map(move |lo| (lo, NATIVE_CHUNK.min(g - lo)))
}

/// One training step's forward and backward on the CPU by hand, without
/// autograd: `cnn_lstm`'s convolution, the LSTM recurrence
/// ([`crate::fused_cpu`]), the attention head ([`crate::fused_attn`]) or
/// the output layer, and the loss, [`NATIVE_CHUNK`] groups at a time.
/// Returns the per-group losses `[G]` and the gradient `[G, P]` of their
/// sum. `tapes` keeps each pass's buffers for the next step.
fn native_step(
    a: &Arch,
    layout: &Layout,
    w: &Tensor,
    x: &Tensor,
    tapes: &mut Vec<Vec<crate::fused_cpu::Tape>>,
    target: &Target,
) -> (Tensor, Tensor) {
    let grad = tch::no_grad(|| w.zeros_like());
    let mut losses = Vec::new();
    for (c, (lo, n)) in chunks(w.size()[0]).enumerate() {
        if tapes.len() <= c {
            tapes.push(Vec::new());
        }
        let (y, mask, len) = (
            target.y.narrow(0, lo, n),
            target.mask.narrow(0, lo, n),
            target.len.narrow(0, lo, n),
        );
        let part = Target {
            y: &y,
            mask: &mask,
            len: &len,
        };
        losses.push(native_step_part(
            a,
            layout,
            &w.narrow(0, lo, n),
            &x.narrow(0, lo, n),
            &mut tapes[c],
            &part,
            &grad.narrow(0, lo, n),
        ));
    }
    (Tensor::cat(&losses, 0), grad)
}

/// [`native_step`] for the groups of `w` (rows of the step's weights): the
/// losses, with the gradient written into `grad` (the same rows of the
/// step's gradient).
fn native_step_part(
    a: &Arch,
    layout: &Layout,
    w: &Tensor,
    x: &Tensor,
    tapes: &mut Vec<crate::fused_cpu::Tape>,
    target: &Target,
    grad: &Tensor,
) -> Tensor {
    let p = layout.views(w);
    let t = x.size()[2];
    let conv = (a.kind == ModelKind::CnnLstm).then(|| conv_forward(a, &p, x));
    let mut s = match &conv {
        Some(c) => c.out.shallow_clone(),
        None => x.transpose(1, 2).contiguous(),
    };
    let name = |k: &str, l: usize| format!("lstm.{k}_l{l}");
    let weight = |k: &str, l: usize| p.get(&name(k, l)).detach();
    // The last step's tapes lend this one their buffers.
    let mut reuse: Vec<Option<crate::fused_cpu::Tape>> = tapes.drain(..).map(Some).collect();
    reuse.resize_with(a.layers as usize, || None);
    for (l, old) in reuse.into_iter().enumerate() {
        let (out, tape) = crate::fused_cpu::forward(
            &s,
            &weight("weight_ih", l),
            &weight("weight_hh", l),
            &weight("bias_ih", l),
            &weight("bias_hh", l),
            old,
        );
        tapes.push(tape);
        s = out;
    }
    let set = |n: &str, v: &Tensor| {
        tch::no_grad(|| {
            let _ = layout.grad_of(grad, n).g_add_(v);
        })
    };
    let (loss, mut dh) = tch::no_grad(|| match a.kind {
        ModelKind::LstmAttention => {
            let hp = head_params(&p);
            let (pred, head) = crate::fused_attn::forward(&s, &head_view(&hp));
            let g = crate::fused_attn::backward(&head, &s, &target.dpred(&pred), &head_view(&hp));
            for (n, v) in [
                ("attn_w.weight", &g.w_a),
                ("attn_w.bias", &g.b_a),
                ("attn_v.weight", &g.v),
                ("out.weight", &g.w_o),
                ("out.bias", &g.b_o),
            ] {
                set(n, v);
            }
            (target.loss(&pred), g.ds)
        }
        _ => {
            let last = s.select(1, t - 1);
            let pred = out_layer(&p, &last);
            let dpred = target.dpred(&pred);
            set("out.weight", &dpred.unsqueeze(1).bmm(&last));
            set("out.bias", &dpred.sum_dim_intlist(1, true, Kind::Float));
            let dh = s.zeros_like();
            dh.select(1, t - 1)
                .copy_(&(dpred.unsqueeze(2) * p.get("out.weight")));
            (target.loss(&pred), dh)
        }
    });
    for (l, tape) in tapes.iter().enumerate().rev() {
        let g = crate::fused_cpu::backward(
            tape,
            &dh,
            &weight("weight_ih", l),
            &weight("weight_hh", l),
            l > 0 || conv.is_some(),
        );
        set(&name("weight_ih", l), &g.w_ih);
        set(&name("weight_hh", l), &g.w_hh);
        set(&name("bias_ih", l), &g.bias);
        set(&name("bias_hh", l), &g.bias);
        if let Some(dx) = g.dx {
            dh = dx;
        }
    }
    if let Some(c) = conv {
        // The convolution's gradient, from the recurrence's input gradient:
        // through the ReLU, then the products with the unfolded input.
        tch::no_grad(|| {
            let [g, t, b, ch] = dh.size()[..] else {
                unreachable!("dh is [G, T, B, C]")
            };
            let dpre = (dh * c.out.gt(0.0)).view([g, t * b, ch]);
            let shape = p.get("conv.weight").size();
            set(
                "conv.weight",
                &dpre.transpose(1, 2).bmm(&c.cols).view(shape.as_slice()),
            );
            set("conv.bias", &dpre.sum_dim_intlist(1, false, Kind::Float));
        });
    }
    loss
}

/// `cnn_lstm`'s convolution by hand, for [`native_step_part`].
struct Conv {
    /// `[G, T·B, F·K]`: the input unfolded over the kernel's taps.
    cols: Tensor,
    /// `[G, T, B, C]`: the convolution's output after the ReLU.
    out: Tensor,
}

/// `cnn_lstm`'s convolution and ReLU over `x` `[G, B, T, F]` as one
/// product per group with the input unfolded over the kernel's `K` taps
/// (PyTorch's `conv1d`, a cross-correlation with `K / 2` zeros of padding
/// each side), without autograd: the output is `[G, T, B, C]`, time-major
/// as the recurrence takes it. Autograd's convolution, ReLU and their
/// backward ran a dozen operators and allocations per step.
fn conv_forward(a: &Arch, p: &Params, x: &Tensor) -> Conv {
    tch::no_grad(|| {
        let [g, b, t, f] = x.size()[..] else {
            unreachable!("x is [G, B, T, F]")
        };
        let (k, pad) = (a.kernel_size, a.kernel_size / 2);
        let c = a.conv_channels;
        let xt = x.transpose(1, 2);
        let zeros = Tensor::zeros([g, pad, b, f], (Kind::Float, x.device()));
        let padded = Tensor::cat(&[&zeros, &xt, &zeros], 1);
        let taps: Vec<Tensor> = (0..k).map(|j| padded.narrow(1, j, t)).collect();
        // [G, T, B, F, K] → [G, T·B, F·K], matching the weights' [C, F, K].
        let cols = Tensor::stack(&taps, 4).reshape([g, t * b, f * k]);
        let w = p.get("conv.weight").reshape([g, c, f * k]);
        let pre = p
            .get("conv.bias")
            .unsqueeze(1)
            .baddbmm(&cols, &w.transpose(1, 2), 1, 1);
        Conv {
            cols,
            out: pre.relu().view([g, t, b, c]),
        }
    })
}

/// One epoch's schedule for the live groups, uploaded at once.
struct Schedule {
    steps: usize,
    /// `[S, L·B]` global window indices (padding points at a real window).
    idx: Tensor,
    /// `[S, L, B]`: 1 for a real sample.
    mask: Tensor,
    /// `[S, L]`: samples in the group's minibatch.
    len: Tensor,
    /// `[S, L, 1]`: 1 where the group takes an Adam step.
    active: Tensor,
    /// `[S, L, 1]`: `-lr / (1 - β1^t)`, 0 where inactive.
    step_size: Tensor,
    /// `[S, L, 1]`: `√(1 - β2^t)`, 1 where inactive.
    bc2_sqrt: Tensor,
    /// `[S, L, 1]`: β2, 1 where inactive.
    beta2: Tensor,
}

/// A group's state, host side.
struct Group {
    n_train: usize,
    /// Offset of its windows in the concatenated training and validation tensors.
    train_off: i64,
    val_off: i64,
    n_val: usize,
    adam_step: i64,
    best_val: f64,
    best_epoch: usize,
    stale: usize,
    initial_val_loss: f64,
    history: Vec<EpochProgress>,
    /// Still training.
    live: bool,
    failed: Option<Error>,
    print: String,
}

/// Trains `members` (same kind and shape: `cfg` and the number of
/// features) as one computation; one result per member, in order, each
/// what [`crate::fit::fit_with`] would have returned for it alone (without
/// a snapshot to resume from). Fails as a whole only when the members do
/// not share a shape.
pub fn fit_fused(
    members: Vec<Member<'_>>,
    cfg: &TrainConfig,
    device: Device,
) -> Result<Vec<Result<Fitted>>> {
    let Some(first) = members.first() else {
        return Ok(Vec::new());
    };
    let arch = Arch::of(cfg, first.ds.n_features());
    for m in &members {
        if m.ds.n_features() != first.ds.n_features() || m.ds.seq_len != first.ds.seq_len {
            return Err(Error::invalid(
                "fused training",
                format!(
                    "members differ in shape: {} features × {} steps against {} × {}",
                    m.ds.n_features(),
                    m.ds.seq_len,
                    first.ds.n_features(),
                    first.ds.seq_len
                ),
            ));
        }
    }
    let group = members.len();
    if device == Device::Cpu {
        keep_freed_memory();
    }
    let shards = match device {
        Device::Cpu => (tch::get_num_threads().max(1) as usize).min(group),
        _ => 1,
    };
    if shards <= 1 {
        return Ok(fit_shard(members, cfg, device, arch, group));
    }
    // On the CPU: one shard of the group per core, each one fused
    // computation on its own thread with libtorch's intra-op threads at 1
    // meanwhile (its OpenMP workers spin between these small operations and
    // would take the cores the shards need). Members are dealt round-robin.
    let mut parts: Vec<Vec<(usize, Member<'_>)>> = (0..shards).map(|_| Vec::new()).collect();
    for (k, m) in members.into_iter().enumerate() {
        parts[k % shards].push((k, m));
    }
    let done: Vec<Vec<(usize, Result<Fitted>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| {
                s.spawn(move || {
                    // This thread's own setting (OpenMP's is per thread).
                    tch::set_num_threads(1);
                    let (ks, ms): (Vec<usize>, Vec<Member<'_>>) = part.into_iter().unzip();
                    ks.into_iter()
                        .zip(fit_shard(ms, cfg, device, arch, group))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut out: Vec<Option<Result<Fitted>>> = (0..group).map(|_| None).collect();
    for (k, r) in done.into_iter().flatten() {
        out[k] = Some(r);
    }
    Ok(out
        .into_iter()
        .map(|r| r.expect("every member has a result"))
        .collect())
}

/// Asks glibc's allocator to keep freed blocks up to 32 MiB in its heap
/// instead of unmapping them: a fused step frees and reallocates tensors of
/// a few MiB, and fresh mappings cost page faults (7% of a CPU step's time
/// before). Once per process; it only affects Linux with glibc.
fn keep_freed_memory() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt takes plain integers and only changes tunables.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
        }
    });
}

/// [`fit_fused`] for one shard: `members` as one computation. `group` is
/// the size of the whole fused group (recorded in each [`Fitted`]).
fn fit_shard(
    members: Vec<Member<'_>>,
    cfg: &TrainConfig,
    device: Device,
    arch: Arch,
    group: usize,
) -> Vec<Result<Fitted>> {
    let (mut members, mut hooks): (Vec<Dataset>, Vec<&mut (dyn FitHooks + Send)>) =
        members.into_iter().map(|m| (m.ds, m.hooks)).unzip();
    let n = members.len();
    let bsz = cfg.batch_size.max(1);

    // Each member's initial weights, exactly as its own fit would set them.
    let probe = nn::VarStore::new(device);
    let _probe_model = build(&probe.root(), &arch);
    let layout = Layout::of(&probe);
    let mut rows = Vec::with_capacity(n);
    let mut groups = Vec::with_capacity(n);
    let (mut xs_t, mut ys_t, mut xs_v, mut ys_v) = (vec![], vec![], vec![], vec![]);
    let (mut train_off, mut val_off) = (0i64, 0i64);
    for (ds, hk) in members.iter().zip(hooks.iter_mut()) {
        let vs = nn::VarStore::new(device);
        let _m = build(&vs.root(), &arch);
        init_seeded(&vs, &arch, cfg.seed);
        let failed = match hk.initial_weights() {
            Some(start) => set_initial_weights(&vs, start, device).err(),
            None => None,
        };
        rows.push(layout.flatten(&vs));
        let (xt, yt) = ds.tensors(ds.splits.train.clone(), device);
        let (xv, yv) = ds.tensors(ds.splits.validation.clone(), device);
        let n_train = ds.splits.train.len();
        let n_val = ds.splits.validation.len();
        groups.push(Group {
            n_train,
            train_off,
            val_off,
            n_val,
            adam_step: 0,
            best_val: f64::INFINITY,
            best_epoch: 0,
            stale: 0,
            initial_val_loss: f64::NAN,
            history: Vec::new(),
            live: failed.is_none() && n_train > 0,
            failed: failed.or_else(|| {
                (n_train == 0).then(|| Error::invalid("training", "no training windows"))
            }),
            print: fingerprint(ds, cfg),
        });
        train_off += n_train as i64;
        val_off += n_val as i64;
        xs_t.push(xt);
        ys_t.push(yt);
        xs_v.push(xv);
        ys_v.push(yv);
    }
    let x_train = Tensor::cat(&xs_t, 0);
    let y_train = Tensor::cat(&ys_t, 0);
    let x_val = Tensor::cat(&xs_v, 0);
    let y_val = Tensor::cat(&ys_v, 0);
    drop((xs_t, ys_t, xs_v, ys_v));

    // Every group's weights, best weights and Adam moments, [G, P].
    let mut w_all = Tensor::stack(&rows, 0);
    let mut best_all = w_all.copy();
    let mut m_all = w_all.zeros_like();
    let mut v_all = w_all.zeros_like();

    // Epoch 0: the untrained models' validation loss.
    let everyone: Vec<usize> = (0..n).filter(|&k| groups[k].live).collect();
    if !everyone.is_empty() {
        let vl = val_losses(
            &arch, &layout, &w_all, &everyone, &groups, &x_val, &y_val, device,
        );
        for (&k, v) in everyone.iter().zip(vl) {
            groups[k].initial_val_loss = v;
            groups[k].best_val = v;
        }
    }

    let native = native_recurrence(&arch, device);
    let mut tapes = Vec::new();
    let started = Instant::now();
    for epoch in 1..=cfg.epochs {
        let live: Vec<usize> = (0..n).filter(|&k| groups[k].live).collect();
        if live.is_empty() {
            break;
        }
        let sched = schedule(&mut groups, &live, epoch, cfg, bsz, device);
        let live_idx = Tensor::from_slice(&live.iter().map(|&k| k as i64).collect::<Vec<_>>())
            .to_device(device);
        let w = w_all.index_select(0, &live_idx).set_requires_grad(true);
        let mut m = m_all.index_select(0, &live_idx);
        let mut v = v_all.index_select(0, &live_idx);
        let l = live.len() as i64;
        let mut sum = Tensor::zeros([l], (Kind::Float, device));
        let (t, f) = (cfg.seq_len as i64, arch.features);
        for s in 0..sched.steps as i64 {
            let idx = sched.idx.get(s);
            let xb = x_train.index_select(0, &idx).view([l, bsz as i64, t, f]);
            let yb = y_train.index_select(0, &idx).view([l, bsz as i64]);
            let len = sched.len.get(s);
            let mask = sched.mask.get(s);
            let target = Target {
                y: &yb,
                mask: &mask,
                len: &len,
            };
            let mut g = w.grad();
            if g.defined() {
                let _ = g.zero_();
            }
            let (loss, g) = if native {
                native_step(&arch, &layout, &w, &xb, &mut tapes, &target)
            } else {
                let loss = target.loss(&forward(&arch, &layout.views(&w), &xb));
                loss.sum(Kind::Float).backward();
                (loss, w.grad())
            };
            tch::no_grad(|| {
                let coef = ((g.square().sum_dim_intlist(1, true, Kind::Float).sqrt() + 1e-6)
                    .reciprocal()
                    * cfg.clip_grad_norm)
                    .clamp_max(1.0);
                let g = g * coef;
                let active = sched.active.get(s);
                let _ = m.lerp_tensor_(&g, &(&active * (1.0 - BETA1)));
                let _ = v.g_mul_(&sched.beta2.get(s));
                let _ = v.addcmul_(&(&g * (1.0 - BETA2)), &g);
                let denom = (v.sqrt() / sched.bc2_sqrt.get(s)).g_add_scalar_(EPS);
                let mut wm = w.shallow_clone();
                let _ = wm.addcdiv_(&(&m * sched.step_size.get(s)), &denom);
                sum += loss.detach() * len;
            });
        }
        let w = w.detach();
        let _ = w_all.index_copy_(0, &live_idx, &w);
        let _ = m_all.index_copy_(0, &live_idx, &m);
        let _ = v_all.index_copy_(0, &live_idx, &v);
        // One read of the epoch's losses per epoch.
        let train_sum: Vec<f32> = Vec::try_from(sum.to_device(Device::Cpu))
            .unwrap_or_else(|_| vec![f32::NAN; live.len()]);
        let val = val_losses(
            &arch, &layout, &w_all, &live, &groups, &x_val, &y_val, device,
        );
        let mut improved = Vec::new();
        for (j, &k) in live.iter().enumerate() {
            let gr = &mut groups[k];
            let train_loss = train_sum[j] as f64 / gr.n_train.max(1) as f64;
            let val_loss = val[j];
            if !train_loss.is_finite() {
                gr.live = false;
                gr.failed = Some(Error::invalid(
                    "training",
                    format!("the training loss diverged to {train_loss} at epoch {epoch}; lower train.learning_rate"),
                ));
                continue;
            }
            if val_loss < gr.best_val {
                gr.best_val = val_loss;
                gr.best_epoch = epoch;
                gr.stale = 0;
                improved.push(k as i64);
            } else {
                gr.stale += 1;
            }
            let p = EpochProgress {
                epoch,
                epochs: cfg.epochs,
                train_loss,
                val_loss,
                best_epoch: gr.best_epoch,
            };
            gr.history.push(p);
        }
        if !improved.is_empty() {
            let i = Tensor::from_slice(&improved).to_device(device);
            let _ = best_all.index_copy_(0, &i, &w_all.index_select(0, &i));
        }
        for &k in &live {
            let gr = &mut groups[k];
            if !gr.live {
                continue;
            }
            let p = *gr.history.last().expect("pushed above");
            if let Err(e) = hooks[k].epoch(p) {
                gr.live = false;
                gr.failed = Some(e);
                continue;
            }
            let done = gr.stale >= cfg.patience || epoch == cfg.epochs;
            let every = hooks[k].snapshot_every();
            if every > 0 && epoch % every == 0 && !done {
                let mut tensors = Vec::with_capacity(layout.params.len() * 4);
                for (prefix, all) in [
                    ("w", &w_all),
                    ("best", &best_all),
                    ("m", &m_all),
                    ("v", &v_all),
                ] {
                    tensors.extend(layout.named_row(&all.get(k as i64), prefix));
                }
                let snap = Snapshot {
                    state: SnapshotState {
                        epoch,
                        best_epoch: gr.best_epoch,
                        best_val_loss: gr.best_val,
                        stale: gr.stale,
                        initial_val_loss: gr.initial_val_loss,
                        adam_step: gr.adam_step,
                        history: gr.history.clone(),
                        fingerprint: gr.print.clone(),
                        data_to: *members[k].ts.last().expect("a dataset has rows"),
                        train_seconds: started.elapsed().as_secs_f64(),
                    },
                    tensors,
                };
                if let Err(e) = hooks[k].snapshot(snap) {
                    gr.live = false;
                    gr.failed = Some(e);
                    continue;
                }
            }
            if gr.stale >= cfg.patience {
                gr.live = false;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();

    let mut out = Vec::with_capacity(n);
    for (k, (ds, gr)) in members.drain(..).zip(groups).enumerate() {
        if let Some(e) = gr.failed {
            out.push(Err(e));
            continue;
        }
        let vs = nn::VarStore::new(device);
        let model = build(&vs.root(), &arch);
        layout.unflatten_into(&best_all.get(k as i64), &vs);
        let (eval, test_points) = evaluate(model.as_ref(), &ds, ds.splits.test.clone(), device);
        if !eval.is_finite() {
            out.push(Err(Error::invalid(
                "training",
                "the test metrics are not finite (the model predicts NaN or infinite returns); lower train.learning_rate",
            )));
            continue;
        }
        let epochs_run = gr.history.len();
        out.push(Ok(Fitted {
            vs,
            model,
            arch,
            dataset: ds,
            eval,
            test_points,
            initial_val_loss: gr.initial_val_loss,
            epochs_run,
            resumed_from_epoch: None,
            best_epoch: gr.best_epoch,
            best_val_loss: gr.best_val,
            stopped_early: epochs_run < cfg.epochs,
            samples_per_sec: (gr.n_train * epochs_run) as f64 / secs.max(1e-9),
            history: gr.history,
            device,
            fused_group: Some(group),
        }));
    }
    out
}

/// The epoch's minibatches of every live group: each group's windows in the
/// order its own fit would shuffle them (seeded by the seed and the epoch),
/// cut into minibatches of `bsz`; steps past a group's last minibatch are
/// inactive. Advances each group's Adam step count.
fn schedule(
    groups: &mut [Group],
    live: &[usize],
    epoch: usize,
    cfg: &TrainConfig,
    bsz: usize,
    device: Device,
) -> Schedule {
    let steps = live
        .iter()
        .map(|&k| groups[k].n_train.div_ceil(bsz))
        .max()
        .unwrap_or(0);
    let l = live.len();
    let mut idx = vec![0i64; steps * l * bsz];
    let mut mask = vec![0f32; steps * l * bsz];
    let mut len = vec![0f32; steps * l];
    let mut active = vec![0f32; steps * l];
    let mut step_size = vec![0f32; steps * l];
    let mut bc2_sqrt = vec![1f32; steps * l];
    let mut beta2 = vec![1f32; steps * l];
    for (j, &k) in live.iter().enumerate() {
        let gr = &mut groups[k];
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            (cfg.seed as u64) ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let mut order: Vec<i64> = (0..gr.n_train as i64).collect();
        order.shuffle(&mut rng);
        for s in 0..steps {
            let at = s * l + j;
            let from = s * bsz;
            if from >= gr.n_train {
                for q in 0..bsz {
                    idx[at * bsz + q] = gr.train_off;
                }
                continue;
            }
            let take = (gr.n_train - from).min(bsz);
            for q in 0..bsz {
                let local = if q < take {
                    order[from + q]
                } else {
                    order[from]
                };
                idx[at * bsz + q] = gr.train_off + local;
                mask[at * bsz + q] = (q < take) as u8 as f32;
            }
            len[at] = take as f32;
            active[at] = 1.0;
            gr.adam_step += 1;
            let t = gr.adam_step as i32;
            // As `fit`'s Adam: the bias corrections in f64, then f32.
            step_size[at] = (-cfg.learning_rate / (1.0 - BETA1.powi(t))) as f32;
            bc2_sqrt[at] = (1.0 - BETA2.powi(t)).sqrt() as f32;
            beta2[at] = BETA2 as f32;
        }
    }
    let (s, l) = (steps as i64, l as i64);
    let up = |v: &[f32], shape: &[i64]| Tensor::from_slice(v).view(shape).to_device(device);
    Schedule {
        steps,
        idx: Tensor::from_slice(&idx)
            .view([s, l * bsz as i64])
            .to_device(device),
        mask: up(&mask, &[s, l, bsz as i64]),
        len: up(&len, &[s, l]),
        active: up(&active, &[s, l, 1]),
        step_size: up(&step_size, &[s, l, 1]),
        bc2_sqrt: up(&bc2_sqrt, &[s, l, 1]),
        beta2: up(&beta2, &[s, l, 1]),
    }
}

/// The validation MSE of each group in `which` with the weights of
/// `w_all`, computed fused in chunks of windows; one read per call.
#[allow(clippy::too_many_arguments)]
fn val_losses(
    arch: &Arch,
    layout: &Layout,
    w_all: &Tensor,
    which: &[usize],
    groups: &[Group],
    x_val: &Tensor,
    y_val: &Tensor,
    device: Device,
) -> Vec<f64> {
    let most = which.iter().map(|&k| groups[k].n_val).max().unwrap_or(0);
    let l = which.len() as i64;
    let sel =
        Tensor::from_slice(&which.iter().map(|&k| k as i64).collect::<Vec<_>>()).to_device(device);
    let w = w_all.index_select(0, &sel);
    let mut sse = Tensor::zeros([l], (Kind::Double, device));
    let native = native_recurrence(arch, device);
    // The native recurrence keeps a tape per pass: smaller chunks.
    let chunk = if native { VAL_CHUNK / 4 } else { VAL_CHUNK };
    let mut tapes = Vec::new();
    tch::no_grad(|| {
        for from in (0..most).step_by(chunk) {
            let c = (most - from).min(chunk);
            let mut idx = Vec::with_capacity(which.len() * c);
            let mut mask = Vec::with_capacity(which.len() * c);
            for &k in which {
                let gr = &groups[k];
                for q in from..from + c {
                    let local = if q < gr.n_val { q as i64 } else { 0 };
                    // A group without validation windows points at row 0 (masked).
                    idx.push(if gr.n_val == 0 { 0 } else { gr.val_off + local });
                    mask.push((q < gr.n_val) as u8 as f32);
                }
            }
            let idx = Tensor::from_slice(&idx).to_device(device);
            let mask = Tensor::from_slice(&mask)
                .view([l, c as i64])
                .to_device(device);
            let (t, f) = (x_val.size()[1], x_val.size()[2]);
            let xb = x_val.index_select(0, &idx).view([l, c as i64, t, f]);
            let yb = y_val.index_select(0, &idx).view([l, c as i64]);
            let pred = if native {
                let parts: Vec<Tensor> = chunks(l)
                    .enumerate()
                    .map(|(c, (lo, n))| {
                        if tapes.len() <= c {
                            tapes.push(Vec::new());
                        }
                        let p = layout.views(&w.narrow(0, lo, n));
                        native_forward(arch, &p, &xb.narrow(0, lo, n), &mut tapes[c])
                    })
                    .collect();
                Tensor::cat(&parts, 0)
            } else {
                forward(arch, &layout.views(&w), &xb)
            };
            sse += ((pred - yb).square() * mask)
                .sum_dim_intlist(1, false, Kind::Float)
                .to_kind(Kind::Double);
        }
    });
    let sse: Vec<f64> = Vec::try_from(sse.to_device(Device::Cpu)).unwrap_or_default();
    which
        .iter()
        .zip(sse)
        .map(|(&k, s)| {
            let nv = groups[k].n_val;
            if nv == 0 {
                f64::NAN
            } else {
                s / nv as f64
            }
        })
        .collect()
}
