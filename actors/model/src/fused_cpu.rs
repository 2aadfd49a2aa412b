//! The LSTM recurrence of fused training on the CPU, forward and backward
//! by hand instead of through autograd. Per time step: one batched matrix
//! product (libtorch's) and one pass of our own over the step's gates that
//! does all the elementwise work at once (activations, cell and hidden
//! state forward; every gate's gradient and the cell's backward), with
//! `exp`/`tanh` that vectorise (AVX2 when the CPU has it, chosen at run
//! time). The weight gradients are one product over all time steps after
//! the loop, not one per step. Autograd would run about ten elementwise
//! operators per step each way, each a pass over memory, and a product per
//! step for the weights; at the sizes of these models the recurrence is
//! bound by those passes.
//!
//! Layouts: sequences are `[G, T, B, X]` (group, time, batch, width),
//! contiguous `f32`; gates are PyTorch's order (i, f, g, o).

use tch::{Kind, Tensor};

use crate::native::{sigmoid, tanh};

/// Lanes of the elementwise passes' blocks.
const LANES: usize = 8;

/// What a layer's forward keeps for its backward.
pub(crate) struct Tape {
    dims: [usize; 5],
    /// `[G, T·B, I]`, the layer's input.
    x: Tensor,
    /// `[G, T, B, 4H]`: the activated gates.
    acts: Tensor,
    /// `[G, T+1, B, H]`: cell states, `c[-1] = 0` first.
    c: Tensor,
    /// `[G, T, B, H]`: `tanh(c)`.
    tc: Tensor,
    /// `[G, T+1, B, H]`: hidden states, `h[-1] = 0` first.
    hs: Tensor,
    /// Scratch, kept with the tape so the next step reuses it (fresh
    /// allocations of this size cost page faults every step).
    hh: Tensor,
    da: Tensor,
    dh_next: Tensor,
    dc: Tensor,
}

/// The gradients of one layer's parameters, and of its input when asked.
pub(crate) struct Grads {
    pub w_ih: Tensor,
    pub w_hh: Tensor,
    /// Of `bias_ih` and of `bias_hh` alike.
    pub bias: Tensor,
    /// `[G, T, B, I]`.
    pub dx: Option<Tensor>,
}

/// A pointer into a contiguous `f32` CPU tensor.
#[derive(Clone, Copy)]
struct Ptr(*mut f32);

fn ptr(t: &Tensor) -> Ptr {
    assert!(
        t.is_contiguous() && t.kind() == Kind::Float && t.device() == tch::Device::Cpu,
        "a contiguous f32 CPU tensor"
    );
    Ptr(t.data_ptr() as *mut f32)
}

/// The forward pass of one time step `k` for group `g`: gates (input
/// projection in `acts` plus `hh`) activated in place, then c, tanh(c), h.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn step_forward(
    d: [usize; 5],
    k: usize,
    g: usize,
    acts: Ptr,
    hh: Ptr,
    c: Ptr,
    tc: Ptr,
    hs: Ptr,
    simd: bool,
) {
    let [_, t, b, _, h] = d;
    for bb in 0..b {
        // SAFETY: offsets within the tensors' sizes (see the layouts); rows
        // of group g only.
        unsafe {
            let a =
                std::slice::from_raw_parts_mut(acts.0.add(((g * t + k) * b + bb) * 4 * h), 4 * h);
            let r = std::slice::from_raw_parts(hh.0.add((g * b + bb) * 4 * h), 4 * h);
            let cp = std::slice::from_raw_parts(c.0.add(((g * (t + 1) + k) * b + bb) * h), h);
            let cn =
                std::slice::from_raw_parts_mut(c.0.add(((g * (t + 1) + k + 1) * b + bb) * h), h);
            let tcn = std::slice::from_raw_parts_mut(tc.0.add(((g * t + k) * b + bb) * h), h);
            let hn =
                std::slice::from_raw_parts_mut(hs.0.add(((g * (t + 1) + k + 1) * b + bb) * h), h);
            cell_forward(a, r, cp, cn, tcn, hn, simd);
        }
    }
}

/// One row of a step's forward pass. Slices as arguments (not locals made
/// from raw pointers) tell the compiler they do not alias, so the loop
/// vectorises.
#[inline(always)]
fn cell_forward(
    a: &mut [f32],
    r: &[f32],
    cp: &[f32],
    cn: &mut [f32],
    tcn: &mut [f32],
    hn: &mut [f32],
    simd: bool,
) {
    let h = cn.len();
    let [ai, af, ag, ao] = gates_mut(a, h);
    let [ri, rf, rg, ro] = gates(r, h);
    let (cp, tcn, hn) = (&cp[..h], &mut tcn[..h], &mut hn[..h]);
    // AVX2 blocks of 8 lanes where the CPU has it (the compiler kept a
    // plain loop over the row scalar), then the rest one lane at a time.
    let full = if simd { h / LANES * LANES } else { 0 };
    #[cfg(target_arch = "x86_64")]
    for base in (0..full).step_by(LANES) {
        let r = base..base + LANES;
        // SAFETY: `simd` only where the CPU has AVX2; every slice has `h`
        // lanes, so each block is in bounds.
        unsafe {
            forward_lanes_avx2(
                [
                    &mut ai[r.clone()],
                    &mut af[r.clone()],
                    &mut ag[r.clone()],
                    &mut ao[r.clone()],
                ],
                [
                    &ri[r.clone()],
                    &rf[r.clone()],
                    &rg[r.clone()],
                    &ro[r.clone()],
                ],
                &cp[r.clone()],
                [&mut cn[r.clone()], &mut tcn[r.clone()], &mut hn[r]],
            )
        };
    }
    for j in full..h {
        let i = sigmoid(ai[j] + ri[j]);
        let f = sigmoid(af[j] + rf[j]);
        let gg = tanh(ag[j] + rg[j]);
        let o = sigmoid(ao[j] + ro[j]);
        (ai[j], af[j], ag[j], ao[j]) = (i, f, gg, o);
        let cv = f * cp[j] + i * gg;
        cn[j] = cv;
        tcn[j] = tanh(cv);
        hn[j] = o * tcn[j];
    }
}

/// A row of gates `[4H]` as its four gates (i, f, g, o), `h` each.
#[inline(always)]
fn gates(row: &[f32], h: usize) -> [&[f32]; 4] {
    let (i, rest) = row.split_at(h);
    let (f, rest) = rest.split_at(h);
    let (g, o) = rest.split_at(h);
    [i, f, g, &o[..h]]
}

/// [`gates`], writable.
#[inline(always)]
fn gates_mut(row: &mut [f32], h: usize) -> [&mut [f32]; 4] {
    let (i, rest) = row.split_at_mut(h);
    let (f, rest) = rest.split_at_mut(h);
    let (g, o) = rest.split_at_mut(h);
    [i, f, g, &mut o[..h]]
}

/// The forward cell on 8 lanes in AVX2: gates `a` (pre-activation in,
/// activated out) plus `r`, the previous cell `cp`, out `[c, tanh c, h]`;
/// the scalar loop's operations in the same order (`exp` as
/// `native::exp`, no fused multiply-adds).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn forward_lanes_avx2(a: [&mut [f32]; 4], r: [&[f32]; 4], cp: &[f32], out: [&mut [f32]; 3]) {
    use std::arch::x86_64::*;
    let [ai, af, ag, ao] = a;
    let [ri, rf, rg, ro] = r;
    let [cn, tcn, hn] = out;
    let ld = |p: &[f32]| _mm256_loadu_ps(p[..LANES].as_ptr());
    let i = simd::sigmoid(_mm256_add_ps(ld(ai), ld(ri)));
    let f = simd::sigmoid(_mm256_add_ps(ld(af), ld(rf)));
    let gg = simd::tanh(_mm256_add_ps(ld(ag), ld(rg)));
    let o = simd::sigmoid(_mm256_add_ps(ld(ao), ld(ro)));
    _mm256_storeu_ps(ai[..LANES].as_mut_ptr(), i);
    _mm256_storeu_ps(af[..LANES].as_mut_ptr(), f);
    _mm256_storeu_ps(ag[..LANES].as_mut_ptr(), gg);
    _mm256_storeu_ps(ao[..LANES].as_mut_ptr(), o);
    let cv = _mm256_add_ps(_mm256_mul_ps(f, ld(cp)), _mm256_mul_ps(i, gg));
    _mm256_storeu_ps(cn[..LANES].as_mut_ptr(), cv);
    let tv = simd::tanh(cv);
    _mm256_storeu_ps(tcn[..LANES].as_mut_ptr(), tv);
    _mm256_storeu_ps(hn[..LANES].as_mut_ptr(), _mm256_mul_ps(o, tv));
}

/// `native::{exp, sigmoid, tanh}` on 8 lanes, operation for operation.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn poly(p: __m256, r: __m256, c: f32) -> __m256 {
        _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(c))
    }

    #[inline(always)]
    pub unsafe fn exp(x: __m256) -> __m256 {
        const MAGIC: f32 = 12_582_912.0;
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
            _mm256_set1_ps(88.0),
        );
        let magic = _mm256_set1_ps(MAGIC);
        let t = _mm256_add_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            magic,
        );
        let n = _mm256_sub_ps(t, magic);
        let r = _mm256_sub_ps(
            _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(LN2_HI))),
            _mm256_mul_ps(n, _mm256_set1_ps(LN2_LO)),
        );
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        p = poly(p, r, 1.398_199_9e-3);
        p = poly(p, r, 8.333_452e-3);
        p = poly(p, r, 4.166_579_6e-2);
        p = poly(p, r, 1.666_666_5e-1);
        p = poly(p, r, 5e-1);
        let p = _mm256_add_ps(
            _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r),
            _mm256_set1_ps(1.0),
        );
        let ni = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B40_0000));
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            ni,
            _mm256_set1_epi32(127),
        )));
        _mm256_mul_ps(p, scale)
    }

    #[inline(always)]
    pub unsafe fn sigmoid(x: __m256) -> __m256 {
        let one = _mm256_set1_ps(1.0);
        _mm256_div_ps(
            one,
            _mm256_add_ps(one, exp(_mm256_sub_ps(_mm256_setzero_ps(), x))),
        )
    }

    #[inline(always)]
    pub unsafe fn tanh(x: __m256) -> __m256 {
        let sign = _mm256_set1_ps(-0.0);
        let a = _mm256_andnot_ps(sign, x);
        let z = _mm256_mul_ps(x, x);
        let mut p = _mm256_set1_ps(-5.704_988_7e-3);
        p = poly(p, z, 2.063_909e-2);
        p = poly(p, z, -5.373_971_6e-2);
        p = poly(p, z, 1.333_144_2e-1);
        p = poly(p, z, -3.333_328e-1);
        let small = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, z), x), x);
        let one = _mm256_set1_ps(1.0);
        let e = exp(_mm256_mul_ps(_mm256_set1_ps(2.0), a));
        let large = _mm256_sub_ps(
            one,
            _mm256_div_ps(_mm256_set1_ps(2.0), _mm256_add_ps(e, one)),
        );
        let large = _mm256_or_ps(large, _mm256_and_ps(sign, x));
        let is_small = _mm256_cmp_ps::<_CMP_LT_OQ>(a, _mm256_set1_ps(0.625));
        _mm256_blendv_ps(large, small, is_small)
    }
}

/// The backward pass of time step `k` for group `g`: the gates' gradients
/// into `da`, the cell's into `dc` (in place), from the output's gradient
/// `dh_out` and the next step's `dh_next`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn step_backward(
    d: [usize; 5],
    k: usize,
    g: usize,
    tape: [Ptr; 3],
    dh_out: Ptr,
    dh_next: Ptr,
    dc: Ptr,
    da: Ptr,
    simd: bool,
) {
    let [_, t, b, _, h] = d;
    let [acts, c, tc] = tape;
    for bb in 0..b {
        // SAFETY: as in step_forward.
        unsafe {
            let a = std::slice::from_raw_parts(acts.0.add(((g * t + k) * b + bb) * 4 * h), 4 * h);
            let cp = std::slice::from_raw_parts(c.0.add(((g * (t + 1) + k) * b + bb) * h), h);
            let tcv = std::slice::from_raw_parts(tc.0.add(((g * t + k) * b + bb) * h), h);
            let dho = std::slice::from_raw_parts(dh_out.0.add(((g * t + k) * b + bb) * h), h);
            let dhn = std::slice::from_raw_parts(dh_next.0.add((g * b + bb) * h), h);
            let dcv = std::slice::from_raw_parts_mut(dc.0.add((g * b + bb) * h), h);
            let out =
                std::slice::from_raw_parts_mut(da.0.add(((g * t + k) * b + bb) * 4 * h), 4 * h);
            cell_backward(a, cp, tcv, dho, dhn, dcv, out, simd);
        }
    }
}

/// One row of a step's backward pass (see [`cell_forward`] on the slices).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn cell_backward(
    a: &[f32],
    cp: &[f32],
    tcv: &[f32],
    dho: &[f32],
    dhn: &[f32],
    dcv: &mut [f32],
    out: &mut [f32],
    simd: bool,
) {
    let h = dcv.len();
    let [di, df, dg, dout] = gates_mut(out, h);
    let [ai, af, ag, ao] = gates(a, h);
    let (cp, tcv, dho, dhn) = (&cp[..h], &tcv[..h], &dho[..h], &dhn[..h]);
    let full = if simd { h / LANES * LANES } else { 0 };
    #[cfg(target_arch = "x86_64")]
    for base in (0..full).step_by(LANES) {
        use std::arch::x86_64::*;
        // SAFETY: `simd` only where the CPU has AVX2; base + LANES <= h for
        // every slice (all have h lanes).
        unsafe {
            let ld = |s: &[f32]| _mm256_loadu_ps(s[base..base + LANES].as_ptr());
            let one = _mm256_set1_ps(1.0);
            let (i, f, gg, o) = (ld(ai), ld(af), ld(ag), ld(ao));
            let dhv = _mm256_add_ps(ld(dho), ld(dhn));
            let tv = ld(tcv);
            let dcc = _mm256_add_ps(
                ld(dcv),
                _mm256_mul_ps(
                    _mm256_mul_ps(dhv, o),
                    _mm256_sub_ps(one, _mm256_mul_ps(tv, tv)),
                ),
            );
            let st = |s: &mut [f32], v| _mm256_storeu_ps(s[base..base + LANES].as_mut_ptr(), v);
            st(
                di,
                _mm256_mul_ps(
                    _mm256_mul_ps(_mm256_mul_ps(dcc, gg), i),
                    _mm256_sub_ps(one, i),
                ),
            );
            st(
                df,
                _mm256_mul_ps(
                    _mm256_mul_ps(_mm256_mul_ps(dcc, ld(cp)), f),
                    _mm256_sub_ps(one, f),
                ),
            );
            st(
                dg,
                _mm256_mul_ps(
                    _mm256_mul_ps(dcc, i),
                    _mm256_sub_ps(one, _mm256_mul_ps(gg, gg)),
                ),
            );
            st(
                dout,
                _mm256_mul_ps(
                    _mm256_mul_ps(_mm256_mul_ps(dhv, tv), o),
                    _mm256_sub_ps(one, o),
                ),
            );
            st(dcv, _mm256_mul_ps(dcc, f));
        }
    }
    for j in full..h {
        let (i, f, gg, o) = (ai[j], af[j], ag[j], ao[j]);
        let dhv = dho[j] + dhn[j];
        let tv = tcv[j];
        let dcc = dcv[j] + dhv * o * (1.0 - tv * tv);
        di[j] = dcc * gg * i * (1.0 - i);
        df[j] = dcc * cp[j] * f * (1.0 - f);
        dg[j] = dcc * i * (1.0 - gg * gg);
        dout[j] = dhv * tv * o * (1.0 - o);
        dcv[j] = dcc * f;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn step_forward_avx2(
    d: [usize; 5],
    k: usize,
    g: usize,
    acts: Ptr,
    hh: Ptr,
    c: Ptr,
    tc: Ptr,
    hs: Ptr,
) {
    step_forward(d, k, g, acts, hh, c, tc, hs, true)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn step_backward_avx2(
    d: [usize; 5],
    k: usize,
    g: usize,
    tape: [Ptr; 3],
    dh_out: Ptr,
    dh_next: Ptr,
    dc: Ptr,
    da: Ptr,
) {
    step_backward(d, k, g, tape, dh_out, dh_next, dc, da, true)
}

fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One LSTM layer over `x` `[G, T, B, I]` with each group's weights
/// (`w_ih` `[G, 4H, I]`, `w_hh` `[G, 4H, H]`, biases `[G, 4H]`): the
/// outputs `[G, T, B, H]` and the tape for [`backward`], whose buffers are
/// `reuse`'s when it has the same sizes. No autograd.
pub(crate) fn forward(
    x: &Tensor,
    w_ih: &Tensor,
    w_hh: &Tensor,
    b_ih: &Tensor,
    b_hh: &Tensor,
    reuse: Option<Tape>,
) -> (Tensor, Tape) {
    tch::no_grad(|| {
        let [g, t, b, i] = x.size()[..] else {
            unreachable!("x is [G, T, B, I]")
        };
        let h = w_hh.size()[2];
        let d = [g as usize, t as usize, b as usize, i as usize, h as usize];
        let opts = (Kind::Float, tch::Device::Cpu);
        let mut tape = match reuse {
            Some(tape) if tape.dims == d => tape,
            _ => Tape {
                dims: d,
                x: Tensor::empty([0], opts),
                acts: Tensor::empty([g, t, b, 4 * h], opts),
                c: Tensor::zeros([g, t + 1, b, h], opts),
                tc: Tensor::empty([g, t, b, h], opts),
                hs: Tensor::zeros([g, t + 1, b, h], opts),
                hh: Tensor::empty([g, b, 4 * h], opts),
                da: Tensor::empty([g, t, b, 4 * h], opts),
                dh_next: Tensor::empty([g, b, h], opts),
                dc: Tensor::empty([g, b, h], opts),
            },
        };
        tape.x = x.contiguous().view([g, t * b, i]);
        let bias = (b_ih + b_hh).unsqueeze(1);
        let _ = bias.baddbmm_out(
            &tape.acts.view([g, t * b, 4 * h]),
            &tape.x,
            &w_ih.transpose(1, 2),
        );
        let w_hh_t = w_hh.transpose(1, 2).contiguous();
        let (pa, ph, pc, pt, phs) = (
            ptr(&tape.acts),
            ptr(&tape.hh),
            ptr(&tape.c),
            ptr(&tape.tc),
            ptr(&tape.hs),
        );
        let fast = avx2();
        for k in 0..t {
            let _ = tape.hs.select(1, k).bmm_out(&tape.hh, &w_hh_t);
            (0..d[0]).for_each(|gi| {
                #[cfg(target_arch = "x86_64")]
                if fast {
                    // SAFETY: the CPU has AVX2 and FMA (checked).
                    return unsafe { step_forward_avx2(d, k as usize, gi, pa, ph, pc, pt, phs) };
                }
                step_forward(d, k as usize, gi, pa, ph, pc, pt, phs, false)
            });
        }
        let out = tape.hs.narrow(1, 1, t).contiguous();
        (out, tape)
    })
}

/// The backward pass of the layer recorded in `tape`, from the gradient of
/// its outputs `dh` `[G, T, B, H]`; the input's gradient only when `dx`.
pub(crate) fn backward(tape: &Tape, dh: &Tensor, w_ih: &Tensor, w_hh: &Tensor, dx: bool) -> Grads {
    tch::no_grad(|| {
        let d = tape.dims;
        let [g, t, b, _, h] = d.map(|v| v as i64);
        let dh = dh.contiguous();
        let (da, mut dh_next, mut dc) = (
            &tape.da,
            tape.dh_next.shallow_clone(),
            tape.dc.shallow_clone(),
        );
        let _ = dh_next.zero_();
        let _ = dc.zero_();
        let w_hh = w_hh.contiguous();
        let taped = [ptr(&tape.acts), ptr(&tape.c), ptr(&tape.tc)];
        let (pdh, pdn, pdc, pda) = (ptr(&dh), ptr(&dh_next), ptr(&dc), ptr(da));
        let fast = avx2();
        for k in (0..t).rev() {
            (0..d[0]).for_each(|gi| {
                #[cfg(target_arch = "x86_64")]
                if fast {
                    // SAFETY: the CPU has AVX2 and FMA (checked).
                    return unsafe {
                        step_backward_avx2(d, k as usize, gi, taped, pdh, pdn, pdc, pda)
                    };
                }
                step_backward(d, k as usize, gi, taped, pdh, pdn, pdc, pda, false)
            });
            if k > 0 {
                let _ = da.select(1, k).bmm_out(&dh_next, &w_hh);
            }
        }
        let da = da.view([g, t * b, 4 * h]);
        let da_t = da.transpose(1, 2);
        let h_prev = tape.hs.narrow(1, 0, t).reshape([g, t * b, h]);
        Grads {
            w_hh: da_t.bmm(&h_prev),
            w_ih: da_t.bmm(&tape.x),
            bias: da.sum_dim_intlist(1, false, Kind::Float),
            dx: dx.then(|| da.bmm(&w_ih.contiguous()).view([g, t, b, -1])),
        }
    })
}
