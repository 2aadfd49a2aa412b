//! The LSTM recurrence of fused training on the CPU, forward and backward
//! by hand instead of through autograd.
//!
//! Where the CPU has AVX2 and FMA and `H % 8 == 0` (the models' sizes),
//! each time step is one kernel of our own per group and pair of batch
//! rows: the gates' products (`b + x_k W_ihᵀ + h_{k-1} W_hhᵀ` forward,
//! `da_{k+1} W_hh` backward) accumulate in registers, 8 hidden units at a
//! time, and the cell's elementwise work (activations, cell and hidden
//! state; every gate's gradient and the cell's backward) runs on them
//! before they leave the registers. No library call per step, no buffer of
//! pre-activations, and a group's weights stay in the L1 cache for all its
//! steps (groups run one after the other). The weight gradients are one
//! product over all time steps after the loop (the input weights' and the
//! bias's in a kernel of our own: a library product with 4 columns ran at
//! a tenth of its speed). Elsewhere (another hidden size, a CPU without
//! AVX2) each step is one batched library product and one scalar pass of
//! our own over the step's gates.
//!
//! Autograd would run about ten elementwise operators per step each way,
//! each a pass over memory, and a product per step for the weights; at the
//! sizes of these models the recurrence is bound by those passes.
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
pub(crate) struct Ptr(pub(crate) *mut f32);

/// `t`'s storage; panics unless `t` is a contiguous `f32` CPU tensor.
pub(crate) fn ptr(t: &Tensor) -> Ptr {
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
fn step_forward(d: [usize; 5], k: usize, g: usize, acts: Ptr, hh: Ptr, c: Ptr, tc: Ptr, hs: Ptr) {
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
            cell_forward(a, r, cp, cn, tcn, hn);
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
) {
    let h = cn.len();
    let [ai, af, ag, ao] = gates_mut(a, h);
    let [ri, rf, rg, ro] = gates(r, h);
    let (cp, tcn, hn) = (&cp[..h], &mut tcn[..h], &mut hn[..h]);
    for j in 0..h {
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

/// The forward cell on 8 lanes in AVX2: the gates' pre-activations `r`
/// (activated out into `a`), the previous cell `cp`, out `[c, tanh c, h]`;
/// the scalar loop's operations in the same order, with the activations
/// of [`simd`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn forward_lanes_avx2(
    a: [&mut [f32]; 4],
    r: [std::arch::x86_64::__m256; 4],
    cp: &[f32],
    out: [&mut [f32]; 3],
) {
    use std::arch::x86_64::*;
    let [ai, af, ag, ao] = a;
    let [ri, rf, rg, ro] = r;
    let [cn, tcn, hn] = out;
    let ld = |p: &[f32]| _mm256_loadu_ps(p[..LANES].as_ptr());
    let i = simd::sigmoid(ri);
    let f = simd::sigmoid(rf);
    let gg = simd::tanh(rg);
    let o = simd::sigmoid(ro);
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

/// `native::{exp, sigmoid, tanh}` on 8 lanes: the same reductions and
/// polynomials, evaluated with fused multiply-adds, and `1 / d` as the
/// reciprocal estimate refined by one Newton step (relative error about
/// 1e-7, the rounding of a division's own order) instead of a division,
/// whose latency bounded the cell.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn poly(p: __m256, r: __m256, c: f32) -> __m256 {
        _mm256_fmadd_ps(p, r, _mm256_set1_ps(c))
    }

    /// `1 / d` for positive normal `d`.
    #[inline(always)]
    unsafe fn recip(d: __m256) -> __m256 {
        let y = _mm256_rcp_ps(d);
        _mm256_fmadd_ps(y, _mm256_fnmadd_ps(d, y, _mm256_set1_ps(1.0)), y)
    }

    #[inline(always)]
    pub unsafe fn exp(x: __m256) -> __m256 {
        const MAGIC: f32 = 12_582_912.0;
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        // The bound first: max/min return their second operand when either
        // is NaN, and a NaN must stay one (as `f32::clamp` keeps it), or a
        // diverged model would train on with finite activations.
        let x = _mm256_min_ps(
            _mm256_set1_ps(88.0),
            _mm256_max_ps(_mm256_set1_ps(-87.0), x),
        );
        let magic = _mm256_set1_ps(MAGIC);
        let t = _mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), magic);
        let n = _mm256_sub_ps(t, magic);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        p = poly(p, r, 1.398_199_9e-3);
        p = poly(p, r, 8.333_452e-3);
        p = poly(p, r, 4.166_579_6e-2);
        p = poly(p, r, 1.666_666_5e-1);
        p = poly(p, r, 5e-1);
        let p = _mm256_add_ps(
            _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r),
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
        recip(_mm256_add_ps(
            one,
            exp(_mm256_sub_ps(_mm256_setzero_ps(), x)),
        ))
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
        let small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), x, x);
        let one = _mm256_set1_ps(1.0);
        let e = exp(_mm256_add_ps(a, a));
        let large = _mm256_fnmadd_ps(_mm256_set1_ps(2.0), recip(_mm256_add_ps(e, one)), one);
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
            cell_backward(a, cp, tcv, dho, dhn, dcv, out);
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
) {
    let h = dcv.len();
    let [di, df, dg, dout] = gates_mut(out, h);
    let [ai, af, ag, ao] = gates(a, h);
    let (cp, tcv, dho, dhn) = (&cp[..h], &tcv[..h], &dho[..h], &dhn[..h]);
    for j in 0..h {
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

/// The backward cell on 8 lanes in AVX2: the activated gates `a`, the
/// taped `[c_prev, tanh c, dh_out]`, the next step's `dh_next`, the cell's
/// gradient `dc` (in place), out the gates' gradients; the scalar loop's
/// operations in the same order.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn backward_lanes_avx2(
    a: [&[f32]; 4],
    taped: [&[f32]; 3],
    dhn: std::arch::x86_64::__m256,
    dcv: &mut [f32],
    out: [&mut [f32]; 4],
) {
    use std::arch::x86_64::*;
    let ld = |s: &[f32]| _mm256_loadu_ps(s[..LANES].as_ptr());
    let st = |s: &mut [f32], v| _mm256_storeu_ps(s[..LANES].as_mut_ptr(), v);
    let [cp, tcv, dho] = taped;
    let [di, df, dg, dout] = out;
    let one = _mm256_set1_ps(1.0);
    let (i, f, gg, o) = (ld(a[0]), ld(a[1]), ld(a[2]), ld(a[3]));
    let dhv = _mm256_add_ps(ld(dho), dhn);
    let tv = ld(tcv);
    let dcc = _mm256_add_ps(
        ld(dcv),
        _mm256_mul_ps(
            _mm256_mul_ps(dhv, o),
            _mm256_sub_ps(one, _mm256_mul_ps(tv, tv)),
        ),
    );
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

/// `len` floats at `p`, as a slice.
///
/// SAFETY: the caller's: `p..p + len` lies in one tensor and nothing else
/// refers to it meanwhile.
#[inline(always)]
unsafe fn at<'a>(p: *mut f32, len: usize) -> &'a mut [f32] {
    std::slice::from_raw_parts_mut(p, len)
}

/// Step `k`'s forward for rows `row..row + R` of group `g` with the
/// products fused in (no library call, no buffer of pre-activations): for
/// each block of 8 hidden units, the four gates' `b + x_k W_ihᵀ + h_{k-1}
/// W_hhᵀ` accumulate in registers (`w_t` is `[W_ihᵀ; W_hhᵀ]`, `[G, I+H,
/// 4H]`, so a gate's 8 units are contiguous in each of its rows; `bias` is
/// `[G, 4H]`, `b_ih + b_hh`), then the cell runs on them as
/// [`forward_lanes_avx2`]. Needs `H % 8 == 0`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn fused_forward_rows<const R: usize>(
    d: [usize; 5],
    k: usize,
    g: usize,
    row: usize,
    [w_t, bias, x]: [Ptr; 3],
    acts: Ptr,
    c: Ptr,
    tc: Ptr,
    hs: Ptr,
) {
    use std::arch::x86_64::*;
    let [_, t, b, n_in, h] = d;
    let x_row = |r: usize| x.0.add(((g * t + k) * b + row + r) * n_in);
    let h_prev = |r: usize| hs.0.add(((g * (t + 1) + k) * b + row + r) * h);
    let wg = w_t.0.add(g * (n_in + h) * 4 * h);
    let bg = bias.0.add(g * 4 * h);
    for u0 in (0..h).step_by(LANES) {
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        for acc in acc.iter_mut() {
            for (q, a) in acc.iter_mut().enumerate() {
                *a = _mm256_loadu_ps(bg.add(q * h + u0));
            }
        }
        for j in 0..n_in + h {
            let wr = wg.add(j * 4 * h + u0);
            let w = [
                _mm256_loadu_ps(wr),
                _mm256_loadu_ps(wr.add(h)),
                _mm256_loadu_ps(wr.add(2 * h)),
                _mm256_loadu_ps(wr.add(3 * h)),
            ];
            for (r, acc) in acc.iter_mut().enumerate() {
                let v = if j < n_in {
                    x_row(r).add(j)
                } else {
                    h_prev(r).add(j - n_in)
                };
                let v = _mm256_broadcast_ss(&*v);
                for q in 0..4 {
                    acc[q] = _mm256_fmadd_ps(v, w[q], acc[q]);
                }
            }
        }
        for (r, acc) in acc.into_iter().enumerate() {
            let bb = row + r;
            let a = acts.0.add(((g * t + k) * b + bb) * 4 * h + u0);
            let cell = |s: usize| (s * b + bb) * h + u0;
            forward_lanes_avx2(
                [
                    at(a, LANES),
                    at(a.add(h), LANES),
                    at(a.add(2 * h), LANES),
                    at(a.add(3 * h), LANES),
                ],
                acc,
                at(c.0.add(cell(g * (t + 1) + k)), LANES),
                [
                    at(c.0.add(cell(g * (t + 1) + k + 1)), LANES),
                    at(tc.0.add(cell(g * t + k)), LANES),
                    at(hs.0.add(cell(g * (t + 1) + k + 1)), LANES),
                ],
            );
        }
    }
}

/// The input weights' and the bias's gradients of group `g`, `Σ_rows da ⊗
/// x` and `Σ_rows da`, over the `T·B` rows of `da` `[G, T·B, 4H]` and `x`
/// `[G, T·B, I]`, into `dw` `[G, 4H, I]` and `db` `[G, 4H]`: 8 gate
/// outputs at a time, up to 4 inputs per pass over the rows. (A library
/// product with 4 columns ran at a tenth of its speed on square ones.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn input_grads(d: [usize; 5], g: usize, da: Ptr, x: Ptr, dw: Ptr, db: Ptr) {
    use std::arch::x86_64::*;
    let [_, t, b, n_in, h] = d;
    let rows = t * b;
    let dag = da.0.add(g * rows * 4 * h);
    for m0 in (0..4 * h).step_by(LANES) {
        let mut sum = _mm256_setzero_ps();
        for r in 0..rows {
            sum = _mm256_add_ps(sum, _mm256_loadu_ps(dag.add(r * 4 * h + m0)));
        }
        _mm256_storeu_ps(db.0.add(g * 4 * h + m0), sum);
        for i0 in (0..n_in).step_by(4) {
            match n_in - i0 {
                1 => input_grads_block::<1>(d, g, m0, i0, da, x, dw),
                2 => input_grads_block::<2>(d, g, m0, i0, da, x, dw),
                3 => input_grads_block::<3>(d, g, m0, i0, da, x, dw),
                _ => input_grads_block::<4>(d, g, m0, i0, da, x, dw),
            }
        }
    }
}

/// [`input_grads`] for gate outputs `m0..m0 + 8` and inputs `i0..i0 + N`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn input_grads_block<const N: usize>(
    d: [usize; 5],
    g: usize,
    m0: usize,
    i0: usize,
    da: Ptr,
    x: Ptr,
    dw: Ptr,
) {
    use std::arch::x86_64::*;
    let [_, t, b, n_in, h] = d;
    let rows = t * b;
    let dag = da.0.add(g * rows * 4 * h + m0);
    let xg = x.0.add(g * rows * n_in + i0);
    let mut acc = [_mm256_setzero_ps(); N];
    for r in 0..rows {
        let dv = _mm256_loadu_ps(dag.add(r * 4 * h));
        let xr = xg.add(r * n_in);
        for (q, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(_mm256_broadcast_ss(&*xr.add(q)), dv, *a);
        }
    }
    let mut lanes = [0f32; LANES];
    for (q, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
        for (l, v) in lanes.iter().enumerate() {
            *dw.0.add((g * 4 * h + m0 + l) * n_in + i0 + q) = *v;
        }
    }
}

/// Step `k`'s backward for rows `row..row + R` of group `g` and hidden
/// units `u0..u0 + 8·NU`, with the recurrent product fused in: the next
/// step's `dh = da_{k+1} W_hh` accumulates in registers (`w_hh` is
/// `[G, 4H, H]`, so the units are contiguous in each row), then the cell
/// runs on it as [`backward_lanes_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn fused_backward_rows<const R: usize, const NU: usize>(
    d: [usize; 5],
    k: usize,
    g: usize,
    row: usize,
    u0: usize,
    w_hh: Ptr,
    tape: [Ptr; 3],
    dh_out: Ptr,
    dc: Ptr,
    da: Ptr,
) {
    use std::arch::x86_64::*;
    let [_, t, b, _, h] = d;
    let [acts, c, tc] = tape;
    let mut acc = [[_mm256_setzero_ps(); NU]; R];
    if k + 1 < t {
        let wg = w_hh.0.add(g * 4 * h * h + u0);
        let da_next = |r: usize| da.0.add(((g * t + k + 1) * b + row + r) * 4 * h);
        for m in 0..4 * h {
            let mut w = [_mm256_setzero_ps(); NU];
            for (q, w) in w.iter_mut().enumerate() {
                *w = _mm256_loadu_ps(wg.add(m * h + q * LANES));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*da_next(r).add(m));
                for q in 0..NU {
                    acc[q] = _mm256_fmadd_ps(x, w[q], acc[q]);
                }
            }
        }
    }
    for (r, acc) in acc.into_iter().enumerate() {
        let bb = row + r;
        for (q, dhn) in acc.into_iter().enumerate() {
            let u = u0 + q * LANES;
            let gate = |p: Ptr| p.0.add(((g * t + k) * b + bb) * 4 * h + u);
            let (a, o) = (gate(acts), gate(da));
            let cell = |s: usize| (s * b + bb) * h + u;
            backward_lanes_avx2(
                [
                    at(a, LANES),
                    at(a.add(h), LANES),
                    at(a.add(2 * h), LANES),
                    at(a.add(3 * h), LANES),
                ],
                [
                    at(c.0.add(cell(g * (t + 1) + k)), LANES),
                    at(tc.0.add(cell(g * t + k)), LANES),
                    at(dh_out.0.add(cell(g * t + k)), LANES),
                ],
                dhn,
                at(dc.0.add((g * b + bb) * h + u), LANES),
                [
                    at(o, LANES),
                    at(o.add(h), LANES),
                    at(o.add(2 * h), LANES),
                    at(o.add(3 * h), LANES),
                ],
            );
        }
    }
}

/// Step `k` of group `g`, forward, through [`fused_forward_rows`]: rows in
/// pairs, an odd last one alone.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn fused_step_forward(
    d: [usize; 5],
    k: usize,
    g: usize,
    inputs: [Ptr; 3],
    acts: Ptr,
    c: Ptr,
    tc: Ptr,
    hs: Ptr,
) {
    let b = d[2];
    let mut row = 0;
    while row + 2 <= b {
        fused_forward_rows::<2>(d, k, g, row, inputs, acts, c, tc, hs);
        row += 2;
    }
    if row < b {
        fused_forward_rows::<1>(d, k, g, row, inputs, acts, c, tc, hs);
    }
}

/// Step `k` of group `g`, backward, through [`fused_backward_rows`]: rows
/// in pairs (an odd last one alone), units 32 at a time, then 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn fused_step_backward(
    d: [usize; 5],
    k: usize,
    g: usize,
    w_hh: Ptr,
    tape: [Ptr; 3],
    dh_out: Ptr,
    dc: Ptr,
    da: Ptr,
) {
    let [_, _, b, _, h] = d;
    let wide = h / (4 * LANES) * 4 * LANES;
    let mut row = 0;
    while row < b {
        let pair = row + 2 <= b;
        for u0 in (0..wide).step_by(4 * LANES) {
            if pair {
                fused_backward_rows::<2, 4>(d, k, g, row, u0, w_hh, tape, dh_out, dc, da);
            } else {
                fused_backward_rows::<1, 4>(d, k, g, row, u0, w_hh, tape, dh_out, dc, da);
            }
        }
        for u0 in (wide..h).step_by(LANES) {
            if pair {
                fused_backward_rows::<2, 1>(d, k, g, row, u0, w_hh, tape, dh_out, dc, da);
            } else {
                fused_backward_rows::<1, 1>(d, k, g, row, u0, w_hh, tape, dh_out, dc, da);
            }
        }
        row += if pair { 2 } else { 1 };
    }
}

/// `v[i] = tanh(v[i])` for all `i`: [`crate::native::tanh`], or in AVX2
/// blocks of 8 [`simd::tanh`] where the CPU has it.
pub(crate) fn tanh_in_place(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked).
        return unsafe { tanh_in_place_avx2(v) };
    }
    v.iter_mut().for_each(|x| *x = tanh(*x));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tanh_in_place_avx2(v: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut blocks = v.chunks_exact_mut(LANES);
    for b in &mut blocks {
        _mm256_storeu_ps(b.as_mut_ptr(), simd::tanh(_mm256_loadu_ps(b.as_ptr())));
    }
    blocks
        .into_remainder()
        .iter_mut()
        .for_each(|x| *x = tanh(*x));
}

/// Whether the CPU has AVX2 and FMA (the kernels of this module and of
/// [`crate::fused_attn`] need both).
pub(crate) fn avx2() -> bool {
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
/// `reuse`'s when it has the same sizes. No autograd. The outputs may share
/// the tape's storage (with one group they are a view of its hidden
/// states, and the next layer's tape keeps them as its input): they are
/// valid until the tape is lent to another call.
pub(crate) fn forward(
    x: &Tensor,
    w_ih: &Tensor,
    w_hh: &Tensor,
    b_ih: &Tensor,
    b_hh: &Tensor,
    reuse: Option<Tape>,
) -> (Tensor, Tape) {
    forward_as(x, w_ih, w_hh, b_ih, b_hh, reuse, avx2())
}

/// [`forward`]: through the AVX2 kernels when `fast` and `H % 8 == 0`,
/// else a library product and a scalar pass per step.
fn forward_as(
    x: &Tensor,
    w_ih: &Tensor,
    w_hh: &Tensor,
    b_ih: &Tensor,
    b_hh: &Tensor,
    reuse: Option<Tape>,
    fast: bool,
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
        #[cfg(target_arch = "x86_64")]
        if fast && d[4].is_multiple_of(LANES) {
            let w_t = Tensor::cat(&[w_ih.transpose(1, 2), w_hh.transpose(1, 2)], 1).contiguous();
            let bias = (b_ih + b_hh).contiguous();
            let inputs = [ptr(&w_t), ptr(&bias), ptr(&tape.x)];
            let (pa, pc, pt, phs) = (ptr(&tape.acts), ptr(&tape.c), ptr(&tape.tc), ptr(&tape.hs));
            // Group by group (they are independent), so that a group's
            // weights stay in the L1 cache for all its steps.
            for gi in 0..d[0] {
                for k in 0..d[1] {
                    // SAFETY: the CPU has AVX2 and FMA (checked); H % 8 == 0.
                    unsafe { fused_step_forward(d, k, gi, inputs, pa, pc, pt, phs) };
                }
            }
            let out = tape.hs.narrow(1, 1, t).contiguous();
            return (out, tape);
        }
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
        for k in 0..t {
            let _ = tape.hs.select(1, k).bmm_out(&tape.hh, &w_hh_t);
            for gi in 0..d[0] {
                step_forward(d, k as usize, gi, pa, ph, pc, pt, phs);
            }
        }
        let out = tape.hs.narrow(1, 1, t).contiguous();
        (out, tape)
    })
}

/// The backward pass of the layer recorded in `tape`, from the gradient of
/// its outputs `dh` `[G, T, B, H]`; the input's gradient only when `dx`.
pub(crate) fn backward(tape: &Tape, dh: &Tensor, w_ih: &Tensor, w_hh: &Tensor, dx: bool) -> Grads {
    backward_as(tape, dh, w_ih, w_hh, dx, avx2())
}

/// [`backward`], in AVX2 only when `fast` (as [`forward_as`]).
fn backward_as(
    tape: &Tape,
    dh: &Tensor,
    w_ih: &Tensor,
    w_hh: &Tensor,
    dx: bool,
    fast: bool,
) -> Grads {
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
        let mut fused = false;
        #[cfg(target_arch = "x86_64")]
        if fast && d[4].is_multiple_of(LANES) {
            fused = true;
            let pw = ptr(&w_hh);
            for gi in 0..d[0] {
                for k in (0..d[1]).rev() {
                    // SAFETY: the CPU has AVX2 and FMA (checked); H % 8 == 0.
                    unsafe { fused_step_backward(d, k, gi, pw, taped, pdh, pdc, pda) };
                }
            }
        }
        for k in (0..t).rev().filter(|_| !fused) {
            for gi in 0..d[0] {
                step_backward(d, k as usize, gi, taped, pdh, pdn, pdc, pda);
            }
            if k > 0 {
                let _ = da.select(1, k).bmm_out(&dh_next, &w_hh);
            }
        }
        let da = da.view([g, t * b, 4 * h]);
        let da_t = da.transpose(1, 2);
        let h_prev = tape.hs.narrow(1, 0, t).reshape([g, t * b, h]);
        // The kernel for few inputs (the features); with as many as the
        // hidden units (a layer over a layer or a convolution) the library
        // product is as fast.
        let (w_ih_grad, bias) = if fused && d[3] <= 2 * LANES {
            let opts = (Kind::Float, tch::Device::Cpu);
            let (dw, db) = (
                Tensor::empty([g, 4 * h, d[3] as i64], opts),
                Tensor::empty([g, 4 * h], opts),
            );
            #[cfg(target_arch = "x86_64")]
            for gi in 0..d[0] {
                // SAFETY: the CPU has AVX2 and FMA (`fused` only then).
                unsafe { input_grads(d, gi, pda, ptr(&tape.x), ptr(&dw), ptr(&db)) };
            }
            (dw, db)
        } else {
            (da_t.bmm(&tape.x), da.sum_dim_intlist(1, false, Kind::Float))
        };
        Grads {
            w_hh: da_t.bmm(&h_prev),
            w_ih: w_ih_grad,
            bias,
            dx: dx.then(|| da.bmm(&w_ih.contiguous()).view([g, t, b, -1])),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layer through libtorch's operators and autograd, as PyTorch's
    /// LSTM computes it: outputs and the gradients of `Σ out · r`.
    fn reference(x: &Tensor, w: [&Tensor; 4], r: &Tensor) -> (Tensor, [Tensor; 5]) {
        let [w_ih, w_hh, b_ih, b_hh] = w;
        let leaf = |t: &Tensor| t.detach().set_requires_grad(true);
        let (x, w_ih, w_hh, b_ih, b_hh) = (leaf(x), leaf(w_ih), leaf(w_hh), leaf(b_ih), leaf(b_hh));
        let [g, t, b, _] = x.size()[..] else {
            unreachable!()
        };
        let h = w_hh.size()[2];
        let (mut hs, mut c) = (
            Tensor::zeros([g, b, h], (Kind::Float, tch::Device::Cpu)),
            Tensor::zeros([g, b, h], (Kind::Float, tch::Device::Cpu)),
        );
        let mut out = vec![];
        for k in 0..t {
            let gates = (x.select(1, k).bmm(&w_ih.transpose(1, 2))
                + hs.bmm(&w_hh.transpose(1, 2))
                + (&b_ih + &b_hh).unsqueeze(1))
            .chunk(4, 2);
            c = gates[1].sigmoid() * &c + gates[0].sigmoid() * gates[2].tanh();
            hs = gates[3].sigmoid() * c.tanh();
            out.push(hs.shallow_clone());
        }
        let out = Tensor::stack(&out, 1);
        (&out * r).sum(Kind::Float).backward();
        (
            out.detach(),
            [x.grad(), w_ih.grad(), w_hh.grad(), b_ih.grad(), b_hh.grad()],
        )
    }

    /// A NaN stays a NaN through the activations, in AVX2 blocks and in
    /// the scalar tail alike, and through a layer, so that a diverged model
    /// shows as one.
    #[test]
    fn a_nan_stays_a_nan() {
        let mut v = vec![0.5f32; 11];
        v[3] = f32::NAN;
        v[10] = f32::NAN;
        tanh_in_place(&mut v);
        assert!(v[3].is_nan() && v[10].is_nan(), "{v:?}");
        assert!(v[0].is_finite());
        let o = (Kind::Float, tch::Device::Cpu);
        let (g, t, b, i, h) = (1, 3, 2, 4, 8);
        let x = Tensor::ones([g, t, b, i], o);
        let _ = x.get(0).get(0).get(0).get(0).fill_(f64::NAN);
        let w = [
            Tensor::ones([g, 4 * h, i], o) * 0.1,
            Tensor::ones([g, 4 * h, h], o) * 0.1,
            Tensor::zeros([g, 4 * h], o),
            Tensor::zeros([g, 4 * h], o),
        ];
        for fast in [false, avx2()] {
            let (out, _) = forward_as(&x, &w[0], &w[1], &w[2], &w[3], None, fast);
            let last = out.get(0).get(t - 1).get(0).get(0).double_value(&[]);
            assert!(last.is_nan(), "AVX2 {fast}: {last}");
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// The hand-written layer equals autograd's, forward and backward, in
    /// AVX2 and in the scalar loop, for hidden sizes that take the fused
    /// product 32 units at a time, 8 at a time, and not at all (H % 8 != 0),
    /// batches that end in an odd row, and inputs whose gradient takes our
    /// kernel (a last block of 1) or the library's product.
    #[test]
    fn the_hand_written_recurrence_equals_autograd() {
        tch::manual_seed(7);
        for (h, b, i) in [(8, 4, 5), (40, 3, 5), (12, 5, 5), (32, 1, 20)] {
            let (g, t) = (3, 6);
            let x = Tensor::randn([g, t, b, i], (Kind::Float, tch::Device::Cpu));
            let w = [
                Tensor::randn([g, 4 * h, i], (Kind::Float, tch::Device::Cpu)) * 0.4,
                Tensor::randn([g, 4 * h, h], (Kind::Float, tch::Device::Cpu)) * 0.4,
                Tensor::randn([g, 4 * h], (Kind::Float, tch::Device::Cpu)) * 0.4,
                Tensor::randn([g, 4 * h], (Kind::Float, tch::Device::Cpu)) * 0.4,
            ];
            let r = Tensor::randn([g, t, b, h], (Kind::Float, tch::Device::Cpu));
            let (out_ref, grads_ref) = reference(&x, [&w[0], &w[1], &w[2], &w[3]], &r);
            for fast in [false, avx2()] {
                let (out, tape) = forward_as(&x, &w[0], &w[1], &w[2], &w[3], None, fast);
                let gr = backward_as(&tape, &r, &w[0], &w[1], true, fast);
                let what = format!("H {h}, B {b}, AVX2 {fast}");
                assert!(max_diff(&out, &out_ref) < 1e-5, "{what}: outputs");
                let [dx, dw_ih, dw_hh, db_ih, db_hh] = &grads_ref;
                assert!(max_diff(gr.dx.as_ref().unwrap(), dx) < 1e-4, "{what}: dx");
                assert!(max_diff(&gr.w_ih, dw_ih) < 1e-4, "{what}: w_ih");
                assert!(max_diff(&gr.w_hh, dw_hh) < 1e-4, "{what}: w_hh");
                assert!(max_diff(&gr.bias, db_ih) < 1e-4, "{what}: b_ih");
                assert!(max_diff(&gr.bias, db_hh) < 1e-4, "{what}: b_hh");
            }
        }
    }
}
