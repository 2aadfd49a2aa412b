//! The forward pass of every model kind in plain Rust, for serving.
//!
//! A forecast runs one window at a time (`n_steps` windows in a row, each
//! needing the previous prediction), so libtorch's cost is its per-operator
//! dispatch, not arithmetic: a hidden-32 LSTM step is 4,096 multiply-adds,
//! fewer than a libtorch call's overhead in cycles. [`NativeModel`] holds
//! the same parameters (read from the loaded var store, PyTorch's names and
//! layouts) in flat `f32` arrays laid out for the loops below, and computes
//! exactly the formulas of `torch.nn.LSTM`, `torch.nn.GRU`, `Conv1d` and
//! the attention head of [`crate::arch`], in `f32` like libtorch does on
//! the CPU. `actors/model/tests/parity.rs` checks its outputs against
//! PyTorch's modules to 1e-5 and against the libtorch forward.
//!
//! Layouts: every weight matrix `W [rows, cols]` is stored transposed,
//! column after column (`wt[c * rows + r] = W[r][c]`), so a product `W x`
//! is a sum of columns scaled by `x[c]`: the inner loop runs over
//! independent outputs and vectorises without reordering any sum.

use std::collections::HashMap;

use tch::Tensor;
use tickmesh_core::config::ModelKind;
use tickmesh_core::{Error, Result};

use crate::arch::Arch;

/// One recurrent layer (`lstm.*_l{k}` or `gru.*_l{k}`).
#[derive(Debug, Clone)]
struct Recurrent {
    /// 4 (LSTM: i, f, g, o) or 3 (GRU: r, z, n).
    gates: usize,
    input: usize,
    hidden: usize,
    /// `weight_ih` transposed: `[input][gates * hidden]`.
    w_ih: Vec<f32>,
    /// `weight_hh` transposed: `[hidden][gates * hidden]`.
    w_hh: Vec<f32>,
    b_ih: Vec<f32>,
    b_hh: Vec<f32>,
}

/// `conv.*`: a Conv1d over time, zero-padded to keep the length.
#[derive(Debug, Clone)]
struct Conv {
    channels: usize,
    kernel: usize,
    /// `[k][f][channel]`: the weight `[C, F, K]` reordered.
    w: Vec<f32>,
    b: Vec<f32>,
}

/// `attn_w` (`[hidden, hidden]` and bias) and `attn_v` (`[1, hidden]`).
#[derive(Debug, Clone)]
struct Attention {
    /// `attn_w.weight` transposed.
    w: Vec<f32>,
    b: Vec<f32>,
    v: Vec<f32>,
}

/// A model's parameters, ready for [`NativeModel::forward`].
#[derive(Debug, Clone)]
pub struct NativeModel {
    kind: ModelKind,
    features: usize,
    hidden: usize,
    conv: Option<Conv>,
    layers: Vec<Recurrent>,
    attention: Option<Attention>,
    out_w: Vec<f32>,
    out_b: f32,
}

/// Working memory of a forward pass, reused between calls.
#[derive(Debug, Default, Clone)]
pub struct Scratch {
    seq_a: Vec<f32>,
    seq_b: Vec<f32>,
    pre: Vec<f32>,
    gates: Vec<f32>,
    h: Vec<f32>,
    c: Vec<f32>,
    tmp: Vec<f32>,
}

/// Reads a parameter as `f32` values, checking its shape.
fn param(vars: &HashMap<String, Tensor>, name: &str, shape: &[i64]) -> Result<Vec<f32>> {
    let t = vars
        .get(name)
        .ok_or_else(|| Error::invalid("checkpoint", format!("the weights lack `{name}`")))?;
    if t.size() != shape {
        return Err(Error::invalid(
            "checkpoint",
            format!("`{name}` has shape {:?}, expected {shape:?}", t.size()),
        ));
    }
    let t = t
        .to_device(tch::Device::Cpu)
        .to_kind(tch::Kind::Float)
        .contiguous()
        .view([-1]);
    Vec::<f32>::try_from(&t).map_err(|e| Error::invalid("checkpoint", format!("`{name}`: {e}")))
}

/// `w [rows, cols]` (row-major) → column-major.
fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

/// `out += W x` with `wt` column-major `[x.len()][out.len()]`.
#[inline(always)]
fn mat_vec_add(out: &mut [f32], wt: &[f32], x: &[f32]) {
    let rows = out.len();
    for (c, &xc) in x.iter().enumerate() {
        let col = &wt[c * rows..(c + 1) * rows];
        for (o, w) in out.iter_mut().zip(col) {
            *o += w * xc;
        }
    }
}

/// `e^x` in `f32` within 2 ulp over the range that matters here (Cephes'
/// `expf`: `x = n ln2 + r`, a degree-6 polynomial in `r`, `2^n` from the
/// exponent bits), clamped to `[-87, 88]`. Branch-free, so loops over slices
/// vectorise; libm's `expf`/`tanhf` calls were half of a forecast's time.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5e-1;
    let p = p * r * r + r + 1.0;
    // The integer n sits in t's low mantissa bits.
    let n = t.to_bits().wrapping_sub(0x4B40_0000) as i32;
    p * f32::from_bits(((n + 127) << 23) as u32)
}

#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `tanh` in `f32` (Cephes' `tanhf`): an odd polynomial below 0.625, else
/// `1 - 2 / (e^{2|x|} + 1)`; both computed and one kept, without a branch.
#[inline(always)]
pub(crate) fn tanh(x: f32) -> f32 {
    let a = x.abs();
    let z = x * x;
    let small =
        ((((-5.704_988_7e-3 * z + 2.063_909e-2) * z - 5.373_971_6e-2) * z + 1.333_144_2e-1) * z
            - 3.333_328e-1)
            * z
            * x
            + x;
    let large = (1.0 - 2.0 / (exp(2.0 * a) + 1.0)).copysign(x);
    if a < 0.625 {
        small
    } else {
        large
    }
}

impl Recurrent {
    fn read(
        vars: &HashMap<String, Tensor>,
        prefix: &str,
        layer: usize,
        gates: usize,
        input: usize,
        hidden: usize,
    ) -> Result<Self> {
        let gh = (gates * hidden) as i64;
        let name = |p: &str| format!("{prefix}.{p}_l{layer}");
        Ok(Recurrent {
            gates,
            input,
            hidden,
            w_ih: transpose(
                &param(vars, &name("weight_ih"), &[gh, input as i64])?,
                gates * hidden,
                input,
            ),
            w_hh: transpose(
                &param(vars, &name("weight_hh"), &[gh, hidden as i64])?,
                gates * hidden,
                hidden,
            ),
            b_ih: param(vars, &name("bias_ih"), &[gh])?,
            b_hh: param(vars, &name("bias_hh"), &[gh])?,
        })
    }

    /// Runs the layer over `xs` (`[t][input]`), writing the hidden states
    /// to `hs` (`[t][hidden]`), from a zero initial state as PyTorch does.
    #[inline(always)]
    fn run(&self, xs: &[f32], steps: usize, hs: &mut Vec<f32>, s: &mut Scratch) {
        let (h, gh) = (self.hidden, self.gates * self.hidden);
        // The input projections of every step first: W_ih x_t + b_ih.
        s.pre.clear();
        s.pre.reserve(steps * gh);
        for t in 0..steps {
            let start = s.pre.len();
            s.pre.extend_from_slice(&self.b_ih);
            mat_vec_add(
                &mut s.pre[start..],
                &self.w_ih,
                &xs[t * self.input..(t + 1) * self.input],
            );
        }
        hs.clear();
        hs.resize(steps * h, 0.0);
        s.h.clear();
        s.h.resize(h, 0.0);
        s.c.clear();
        s.c.resize(h, 0.0);
        s.gates.resize(gh, 0.0);
        for t in 0..steps {
            // W_hh h + b_hh, kept apart from the input part: GRU's n gate
            // scales its recurrent part by r. The gate loops run over
            // zipped slices, without an index, so they vectorise.
            s.gates.copy_from_slice(&self.b_hh);
            mat_vec_add(&mut s.gates, &self.w_hh, &s.h);
            let pre = &s.pre[t * gh..(t + 1) * gh];
            if self.gates == 4 {
                for (g, p) in s.gates.iter_mut().zip(pre) {
                    *g += p;
                }
                let (i, rest) = s.gates.split_at(h);
                let (f, rest) = rest.split_at(h);
                let (g, o) = rest.split_at(h);
                for ((((c, hv), i), f), (g, o)) in
                    s.c.iter_mut()
                        .zip(s.h.iter_mut())
                        .zip(i)
                        .zip(f)
                        .zip(g.iter().zip(o))
                {
                    let next = sigmoid(*f) * *c + sigmoid(*i) * tanh(*g);
                    *c = next;
                    *hv = sigmoid(*o) * tanh(next);
                }
            } else {
                let (rec_r, rest) = s.gates.split_at(h);
                let (rec_z, rec_n) = rest.split_at(h);
                let (pre_r, rest) = pre.split_at(h);
                let (pre_z, pre_n) = rest.split_at(h);
                for ((hv, (rr, pr)), ((rz, pz), (rn, pn))) in
                    s.h.iter_mut()
                        .zip(rec_r.iter().zip(pre_r))
                        .zip(rec_z.iter().zip(pre_z).zip(rec_n.iter().zip(pre_n)))
                {
                    let r = sigmoid(pr + rr);
                    let z = sigmoid(pz + rz);
                    let n = tanh(pn + r * rn);
                    *hv = (1.0 - z) * n + z * *hv;
                }
            }
            hs[t * h..(t + 1) * h].copy_from_slice(&s.h);
        }
    }
}

impl NativeModel {
    /// The model `arch` describes, from its parameters (`vars`, as a var
    /// store holds them: PyTorch's names and shapes).
    pub fn from_vars(arch: &Arch, vars: &HashMap<String, Tensor>) -> Result<Self> {
        let bad = |m: String| Err(Error::invalid("checkpoint", m));
        let (f, h) = (arch.features, arch.hidden);
        if f < 1 || h < 1 || arch.layers < 1 {
            return bad(format!("features {f}, hidden {h}, layers {}", arch.layers));
        }
        let (f, h) = (f as usize, h as usize);
        let conv = match arch.kind {
            ModelKind::CnnLstm => {
                let (c, k) = (arch.conv_channels, arch.kernel_size);
                if c < 1 || k < 1 || k % 2 == 0 {
                    return bad(format!("conv_channels {c}, kernel_size {k}"));
                }
                let w = param(vars, "conv.weight", &[c, f as i64, k])?;
                let (c, k) = (c as usize, k as usize);
                let mut reordered = vec![0.0; w.len()];
                for ci in 0..c {
                    for fi in 0..f {
                        for ki in 0..k {
                            reordered[(ki * f + fi) * c + ci] = w[(ci * f + fi) * k + ki];
                        }
                    }
                }
                Some(Conv {
                    channels: c,
                    kernel: k,
                    w: reordered,
                    b: param(vars, "conv.bias", &[c as i64])?,
                })
            }
            _ => None,
        };
        let (prefix, gates) = match arch.kind {
            ModelKind::Gru => ("gru", 3),
            _ => ("lstm", 4),
        };
        let mut input = conv.as_ref().map_or(f, |c| c.channels);
        let mut layers = Vec::with_capacity(arch.layers as usize);
        for l in 0..arch.layers as usize {
            layers.push(Recurrent::read(vars, prefix, l, gates, input, h)?);
            input = h;
        }
        let attention = match arch.kind {
            ModelKind::LstmAttention => Some(Attention {
                w: transpose(&param(vars, "attn_w.weight", &[h as i64, h as i64])?, h, h),
                b: param(vars, "attn_w.bias", &[h as i64])?,
                v: param(vars, "attn_v.weight", &[1, h as i64])?,
            }),
            _ => None,
        };
        let expected = 2
            + conv.as_ref().map_or(0, |_| 2)
            + 4 * layers.len()
            + attention.as_ref().map_or(0, |_| 3);
        if vars.len() != expected {
            let mut names: Vec<&String> = vars.keys().collect();
            names.sort();
            return bad(format!(
                "{} parameters for a {} model of {} layers, expected {expected}: {names:?}",
                vars.len(),
                arch.kind,
                layers.len()
            ));
        }
        Ok(NativeModel {
            kind: arch.kind,
            features: f,
            hidden: h,
            conv,
            layers,
            attention,
            out_w: param(vars, "out.weight", &[1, h as i64])?,
            out_b: param(vars, "out.bias", &[1])?[0],
        })
    }

    pub fn kind(&self) -> ModelKind {
        self.kind
    }

    /// One window `x` (`[steps][features]`, row-major) → the model's output.
    /// On an x86-64 CPU with AVX2 the same code runs compiled for it
    /// (8 lanes instead of SSE2's 4), chosen at run time.
    pub fn forward(&self, x: &[f32], s: &mut Scratch) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { self.forward_avx2(x, s) };
        }
        self.forward_portable(x, s)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn forward_avx2(&self, x: &[f32], s: &mut Scratch) -> f32 {
        self.forward_portable(x, s)
    }

    #[inline(always)]
    fn forward_portable(&self, x: &[f32], s: &mut Scratch) -> f32 {
        assert!(
            !x.is_empty() && x.len().is_multiple_of(self.features),
            "a window is whole rows of {} features",
            self.features
        );
        let steps = x.len() / self.features;
        let mut input = std::mem::take(&mut s.seq_a);
        let mut output = std::mem::take(&mut s.seq_b);
        input.clear();
        match &self.conv {
            Some(conv) => {
                let (c, k, f) = (conv.channels, conv.kernel, self.features);
                let pad = k / 2;
                for t in 0..steps {
                    let start = input.len();
                    input.extend_from_slice(&conv.b);
                    let row = &mut input[start..start + c];
                    for ki in 0..k {
                        // Input time t + ki - pad; outside the window: zero.
                        let Some(src) = (t + ki).checked_sub(pad).filter(|&u| u < steps) else {
                            continue;
                        };
                        mat_vec_add(
                            row,
                            &conv.w[ki * f * c..(ki + 1) * f * c],
                            &x[src * f..(src + 1) * f],
                        );
                    }
                    for v in row.iter_mut() {
                        *v = v.max(0.0);
                    }
                }
            }
            None => input.extend_from_slice(x),
        }
        for layer in &self.layers {
            layer.run(&input, steps, &mut output, s);
            std::mem::swap(&mut input, &mut output);
        }
        // `input` holds the last layer's hidden states, [steps][hidden].
        let h = self.hidden;
        let y = match &self.attention {
            Some(a) => {
                // scores_t = v · tanh(W h_t + b); α = softmax over time.
                let mut scores = std::mem::take(&mut s.tmp);
                scores.clear();
                s.gates.resize(h, 0.0);
                for t in 0..steps {
                    s.gates[..h].copy_from_slice(&a.b);
                    mat_vec_add(&mut s.gates[..h], &a.w, &input[t * h..(t + 1) * h]);
                    for z in &mut s.gates[..h] {
                        *z = tanh(*z);
                    }
                    scores.push(dot(&a.v, &s.gates[..h]));
                }
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut total = 0.0f32;
                for sc in scores.iter_mut() {
                    *sc = exp(*sc - max);
                    total += *sc;
                }
                s.c.clear();
                s.c.resize(h, 0.0);
                for (t, sc) in scores.iter().enumerate() {
                    let alpha = sc / total;
                    for (c, hv) in s.c.iter_mut().zip(&input[t * h..(t + 1) * h]) {
                        *c += alpha * hv;
                    }
                }
                s.tmp = scores;
                dot(&self.out_w, &s.c) + self.out_b
            }
            None => dot(&self.out_w, &input[(steps - 1) * h..steps * h]) + self.out_b,
        };
        s.seq_a = input;
        s.seq_b = output;
        y
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The approximations against the standard library's, on a fine grid
    /// over the range the gates see (and beyond, where they saturate).
    #[test]
    fn exp_sigmoid_and_tanh_are_within_a_few_ulp() {
        let (mut worst_exp, mut worst_tanh, mut worst_sig) = (0.0f64, 0.0f64, 0.0f64);
        for i in -2_000_000..=2_000_000 {
            let x = i as f32 * 4e-5; // [-80, 80]
            let rel = |a: f32, b: f32| ((a as f64 - b as f64) / (b as f64).abs().max(1e-30)).abs();
            worst_exp = worst_exp.max(rel(exp(x), x.exp()));
            worst_tanh = worst_tanh.max((tanh(x) as f64 - (x as f64).tanh()).abs());
            worst_sig =
                worst_sig.max((sigmoid(x) as f64 - 1.0 / (1.0 + (-(x as f64)).exp())).abs());
        }
        assert!(worst_exp < 4e-7, "exp: relative {worst_exp}");
        assert!(worst_tanh < 2e-7, "tanh: absolute {worst_tanh}");
        assert!(worst_sig < 2e-7, "sigmoid: absolute {worst_sig}");
        assert_eq!(tanh(0.0), 0.0);
        assert_eq!(tanh(-200.0), -1.0);
        assert!(sigmoid(-200.0) < 1e-37);
        assert!(exp(200.0).is_finite());
    }

    /// The AVX2 build of the forward pass computes the same operations in
    /// the same order as the portable one: the outputs are bit-identical.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_path_equals_the_portable_one_bit_for_bit() {
        if !std::is_x86_feature_detected!("avx2") {
            eprintln!("no AVX2 on this CPU: only the portable path runs here");
            return;
        }
        for kind in ModelKind::ALL {
            let a = Arch {
                kind,
                features: 5,
                hidden: 16,
                layers: 2,
                conv_channels: 12,
                kernel_size: 3,
            };
            let vs = tch::nn::VarStore::new(tch::Device::Cpu);
            let _m = crate::arch::build(&vs.root(), &a);
            crate::arch::init_seeded(&vs, &a, 3);
            let m = NativeModel::from_vars(&a, &vs.variables()).unwrap();
            let mut s = Scratch::default();
            for w in 0..20 {
                let x: Vec<f32> = (0..30 * 5)
                    .map(|i| ((i * 7 + w * 13) % 23) as f32 / 11.5 - 1.0)
                    .collect();
                let portable = m.forward_portable(&x, &mut s);
                // SAFETY: AVX2 checked above.
                let avx2 = unsafe { m.forward_avx2(&x, &mut s) };
                assert_eq!(portable.to_bits(), avx2.to_bits(), "{kind} window {w}");
            }
        }
    }
}
