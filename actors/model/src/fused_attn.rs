//! The attention head of `lstm_attention` and the loss, in fused training
//! on the CPU, forward and backward by hand instead of through autograd
//! (as [`crate::fused_cpu`] does for the recurrence). Autograd ran about
//! twenty operators over `[G, T·B, H]` per step, each a pass over memory,
//! with libtorch's accurate (slow) `tanh`; here the two products with
//! `attn_w` stay libtorch's and one pass per batch row does the rest.
//!
//! The head, per group and batch row `b`, over the LSTM's states `s_t`:
//! `u_t = tanh(W_a s_t + b_a)`, `e_t = v · u_t`, `α = softmax(e)`,
//! `ctx = Σ α_t s_t`, `pred = w_o · ctx + b_o`; the loss is the group's mean
//! squared error over its real samples. Layouts: `s` is `[G, T, B, H]`.

use tch::{Kind, Tensor};

use crate::fused_cpu::tanh_in_place;
use crate::native::exp;

/// What the forward keeps for the backward.
pub(crate) struct Head {
    dims: [usize; 4],
    /// `[G, T·B, H]`: `u`.
    u: Tensor,
    /// `[G, B, T]`: `α`.
    alpha: Tensor,
    /// `[G, B, H]`: the context.
    ctx: Tensor,
}

/// The head's parameters, `[G, …]` each (views of the flat weights).
pub(crate) struct HeadParams<'a> {
    /// `attn_w.weight` `[G, H, H]`.
    pub w_a: &'a Tensor,
    /// `attn_w.bias` `[G, H]`.
    pub b_a: &'a Tensor,
    /// `attn_v.weight` `[G, 1, H]`.
    pub v: &'a Tensor,
    /// `out.weight` `[G, 1, H]`.
    pub w_o: &'a Tensor,
    /// `out.bias` `[G, 1]`.
    pub b_o: &'a Tensor,
}

/// The gradients of the head's parameters (shaped as [`HeadParams`]) and
/// of its input `s`.
pub(crate) struct HeadGrads {
    pub w_a: Tensor,
    pub b_a: Tensor,
    pub v: Tensor,
    pub w_o: Tensor,
    pub b_o: Tensor,
    /// `[G, T, B, H]`.
    pub ds: Tensor,
}

/// A contiguous `f32` CPU tensor's elements.
fn floats(t: &Tensor) -> &[f32] {
    let p = crate::fused_cpu::ptr(t);
    // SAFETY: contiguous f32 storage of numel elements (checked by `ptr`),
    // alive as long as `t`.
    unsafe { std::slice::from_raw_parts(p.0, t.numel()) }
}

/// [`floats`], writable; `t` must not be shared with another slice.
#[allow(clippy::mut_from_ref)]
fn floats_mut(t: &Tensor) -> &mut [f32] {
    let n = floats(t).len();
    // SAFETY: as `floats`; the callers hold no other view of `t`'s storage.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, n) }
}

/// `Σ a_i b_i` in 8 lanes (so that it vectorises), then across them.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    let mut sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

/// Defines `$name(args)` that runs `$inner(args)` compiled for AVX2 and
/// FMA where the CPU has them (its loops then vectorise 8 lanes wide),
/// else as it is.
macro_rules! wide {
    ($name:ident, $avx2:ident, $inner:ident($($a:ident: $t:ty),*)) => {
        #[allow(clippy::too_many_arguments)]
        fn $name($($a: $t),*) {
            #[cfg(target_arch = "x86_64")]
            if crate::fused_cpu::avx2() {
                // SAFETY: the CPU has AVX2 and FMA (checked).
                return unsafe { $avx2($($a),*) };
            }
            $inner($($a),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $avx2($($a: $t),*) {
            $inner($($a),*)
        }
    };
}

wide!(forward_rows, forward_rows_avx2, forward_rows_any(
    d: [usize; 4], sf: &[f32], uf: &[f32], vf: &[f32], wf: &[f32], bf: &[f32],
    af: &mut [f32], cf: &mut [f32], pf: &mut [f32]
));

/// The forward's pass over every group and batch row (see the module).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_rows_any(
    [gu, tu, bu, hu]: [usize; 4],
    sf: &[f32],
    uf: &[f32],
    vf: &[f32],
    wf: &[f32],
    bf: &[f32],
    af: &mut [f32],
    cf: &mut [f32],
    pf: &mut [f32],
) {
    let row = |gi: usize, ti: usize, bi: usize| ((gi * tu + ti) * bu + bi) * hu;
    for gi in 0..gu {
        let vg = &vf[gi * hu..(gi + 1) * hu];
        for bi in 0..bu {
            let al = &mut af[(gi * bu + bi) * tu..][..tu];
            for (ti, e) in al.iter_mut().enumerate() {
                *e = dot(&uf[row(gi, ti, bi)..][..hu], vg);
            }
            let m = al.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            al.iter_mut().for_each(|e| *e = exp(*e - m));
            let z: f32 = al.iter().sum();
            al.iter_mut().for_each(|e| *e /= z);
            let c = &mut cf[(gi * bu + bi) * hu..][..hu];
            for (ti, &a) in al.iter().enumerate() {
                let st = &sf[row(gi, ti, bi)..][..hu];
                c.iter_mut().zip(st).for_each(|(c, s)| *c += a * s);
            }
            pf[gi * bu + bi] = dot(&wf[gi * hu..(gi + 1) * hu], c) + bf[gi];
        }
    }
}

wide!(backward_rows, backward_rows_avx2, backward_rows_any(
    d: [usize; 4], ins: [&[f32]; 4], params: [&[f32]; 3],
    dsf: &mut [f32], dzf: &mut [f32], outs: [&mut [f32]; 3]
));

/// The backward's pass over every group and batch row: `ins` are `s`,
/// `u`, `α`, the context; `params` `v`, `w_o`, `dpred`; `outs` the
/// gradients of `w_o`, `b_o`, `v` (accumulated).
#[inline(always)]
fn backward_rows_any(
    [gu, tu, bu, hu]: [usize; 4],
    [sf, uf, af, cf]: [&[f32]; 4],
    [vf, wf, dpf]: [&[f32]; 3],
    dsf: &mut [f32],
    dzf: &mut [f32],
    [dwf, dbf, dvf]: [&mut [f32]; 3],
) {
    let row = |gi: usize, ti: usize, bi: usize| ((gi * tu + ti) * bu + bi) * hu;
    let mut dctx = vec![0f32; hu];
    let mut da = vec![0f32; tu];
    for gi in 0..gu {
        let (vg, wg) = (&vf[gi * hu..][..hu], &wf[gi * hu..][..hu]);
        let dvg = &mut dvf[gi * hu..][..hu];
        for bi in 0..bu {
            let dp = dpf[gi * bu + bi];
            let c = &cf[(gi * bu + bi) * hu..][..hu];
            dwf[gi * hu..][..hu]
                .iter_mut()
                .zip(c)
                .for_each(|(d, c)| *d += dp * c);
            dbf[gi] += dp;
            dctx.iter_mut().zip(wg).for_each(|(d, w)| *d = dp * w);
            let al = &af[(gi * bu + bi) * tu..][..tu];
            for (ti, d) in da.iter_mut().enumerate() {
                *d = dot(&dctx, &sf[row(gi, ti, bi)..][..hu]);
            }
            let sum: f32 = al.iter().zip(&da).map(|(a, d)| a * d).sum();
            for ti in 0..tu {
                let (a, r) = (al[ti], row(gi, ti, bi));
                let de = a * (da[ti] - sum);
                dsf[r..r + hu]
                    .iter_mut()
                    .zip(&dctx)
                    .for_each(|(d, c)| *d = a * c);
                let u = &uf[r..r + hu];
                dvg.iter_mut().zip(u).for_each(|(d, u)| *d += de * u);
                let rz = ((gi * bu + bi) * tu + ti) * hu;
                for ((dz, u), v) in dzf[rz..rz + hu].iter_mut().zip(u).zip(vg) {
                    *dz = de * v * (1.0 - u * u);
                }
            }
        }
    }
}

/// The head over `s` `[G, T, B, H]`: the predictions `[G, B]` and what the
/// backward needs. No autograd.
pub(crate) fn forward(s: &Tensor, p: &HeadParams) -> (Tensor, Head) {
    tch::no_grad(|| {
        let [g, t, b, h] = s.size()[..] else {
            unreachable!("s is [G, T, B, H]")
        };
        let dims = [g, t, b, h].map(|v| v as usize);
        let opts = (Kind::Float, tch::Device::Cpu);
        let s = s.contiguous();
        let u = p
            .b_a
            .unsqueeze(1)
            .baddbmm(&s.view([g, t * b, h]), &p.w_a.transpose(1, 2), 1, 1)
            .contiguous();
        let (alpha, ctx, pred) = (
            Tensor::empty([g, b, t], opts),
            Tensor::zeros([g, b, h], opts),
            Tensor::empty([g, b], opts),
        );
        let (v, w_o, b_o) = (p.v.contiguous(), p.w_o.contiguous(), p.b_o.contiguous());
        let uf = floats_mut(&u);
        tanh_in_place(uf);
        let (sf, vf, wf, bf) = (floats(&s), floats(&v), floats(&w_o), floats(&b_o));
        let (af, cf, pf) = (floats_mut(&alpha), floats_mut(&ctx), floats_mut(&pred));
        forward_rows(dims, sf, uf, vf, wf, bf, af, cf, pf);
        (
            pred,
            Head {
                dims,
                u,
                alpha,
                ctx,
            },
        )
    })
}

/// The backward of the head recorded in `head` over the same `s`, from the
/// predictions' gradient `dpred` `[G, B]`.
pub(crate) fn backward(head: &Head, s: &Tensor, dpred: &Tensor, p: &HeadParams) -> HeadGrads {
    tch::no_grad(|| {
        let [g, t, b, h] = head.dims.map(|v| v as i64);
        let opts = (Kind::Float, tch::Device::Cpu);
        let s = s.contiguous();
        let dpred = dpred.contiguous();
        let (v, w_o) = (p.v.contiguous(), p.w_o.contiguous());
        // dz batch-major, `[G, B·T, H]`, as the lone model's `[B, T, H]`:
        // the bias's gradient then adds its rows in the same order (it is
        // a sum of nearly cancelling terms, whose rounding Adam's
        // normalisation amplifies).
        let (ds, dz) = (
            Tensor::empty([g, t, b, h], opts),
            Tensor::empty([g, b * t, h], opts),
        );
        let (dw_o, db_o, dv) = (
            Tensor::zeros([g, 1, h], opts),
            Tensor::zeros([g, 1], opts),
            Tensor::zeros([g, 1, h], opts),
        );
        let (sf, uf, af, cf) = (
            floats(&s),
            floats(&head.u),
            floats(&head.alpha),
            floats(&head.ctx),
        );
        let (vf, wf, dpf) = (floats(&v), floats(&w_o), floats(&dpred));
        let (dsf, dzf) = (floats_mut(&ds), floats_mut(&dz));
        let (dwf, dbf, dvf) = (floats_mut(&dw_o), floats_mut(&db_o), floats_mut(&dv));
        backward_rows(
            head.dims,
            [sf, uf, af, cf],
            [vf, wf, dpf],
            dsf,
            dzf,
            [dwf, dbf, dvf],
        );
        let s_bm = s.transpose(1, 2).contiguous().view([g, b * t, h]);
        let ds_attn = dz.bmm(&p.w_a.contiguous()).view([g, b, t, h]);
        let _ = ds.shallow_clone().g_add_(&ds_attn.transpose(1, 2));
        HeadGrads {
            w_a: dz.transpose(1, 2).bmm(&s_bm),
            b_a: dz.sum_dim_intlist(1, false, Kind::Float),
            v: dv,
            w_o: dw_o,
            b_o: db_o,
            ds,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The head by hand equals the head through libtorch's operators and
    /// autograd (as `arch`'s `lstm_attention` computes it, batch-major),
    /// outputs and every gradient.
    #[test]
    fn the_hand_written_head_equals_autograd() {
        tch::manual_seed(11);
        let o = (Kind::Float, tch::Device::Cpu);
        for (g, t, b, h) in [(3, 7, 5, 8), (2, 30, 4, 32), (2, 5, 3, 12)] {
            let leaf = |t: Tensor| t.set_requires_grad(true);
            let s = leaf(Tensor::randn([g, t, b, h], o));
            let w_a = leaf(Tensor::randn([g, h, h], o) * 0.3);
            let b_a = leaf(Tensor::randn([g, h], o) * 0.3);
            let v = leaf(Tensor::randn([g, 1, h], o) * 0.3);
            let w_o = leaf(Tensor::randn([g, 1, h], o) * 0.3);
            let b_o = leaf(Tensor::randn([g, 1], o) * 0.3);
            let r = Tensor::randn([g, b], o);
            // Reference: [G, B, T, H] as the lone model's [B, T, H].
            let sb = s.transpose(1, 2);
            let hidden =
                (sb.matmul(&w_a.transpose(1, 2).unsqueeze(1)) + b_a.view([g, 1, 1, h])).tanh();
            let scores = hidden.matmul(&v.transpose(1, 2).unsqueeze(1));
            let alpha = scores.softmax(2, Kind::Float);
            let ctx = (alpha * &sb).sum_dim_intlist(2, false, Kind::Float);
            let pred_ref = ctx.bmm(&w_o.transpose(1, 2)).squeeze_dim(-1) + &b_o;
            (&pred_ref * &r).sum(Kind::Float).backward();
            let p = HeadParams {
                w_a: &w_a.detach(),
                b_a: &b_a.detach(),
                v: &v.detach(),
                w_o: &w_o.detach(),
                b_o: &b_o.detach(),
            };
            let (pred, head) = forward(&s.detach(), &p);
            let grads = backward(&head, &s.detach(), &r, &p);
            let close = |ours: &Tensor, reference: &Tensor, what: &str| {
                let d = (ours - reference).abs().max().double_value(&[]);
                assert!(d < 2e-5, "G {g} T {t} B {b} H {h}: {what} differs by {d}");
            };
            close(&pred, &pred_ref.detach(), "pred");
            close(&grads.ds, &s.grad(), "ds");
            close(&grads.w_a, &w_a.grad(), "w_a");
            close(&grads.b_a, &b_a.grad(), "b_a");
            close(&grads.v, &v.grad(), "v");
            close(&grads.w_o, &w_o.grad(), "w_o");
            close(&grads.b_o, &b_o.grad(), "b_o");
        }
    }
}
