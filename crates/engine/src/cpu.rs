//! The CPU reference backend: `matrixmultiply`'s SIMD SGEMM for the linear layers and the
//! attention products of long sequences, direct register-blocked loops for short ones, and
//! plain Rust loops written in sixteen-lane chunks for everything else, compiled for AVX-512 or
//! AVX2 behind one runtime check ([`vectorized`]) so they run as vector code. On wasm the same
//! loops are compiled once for the target's SIMD.

use std::sync::Arc;

use crate::{
    AttentionParams, Backend, Result, Shaped, check_linear, check_pool, check_reshape, check_rope,
    check_same, check_slice_rows, check_write_rows, ops, shape_err,
};

/// A host tensor. Cloning is cheap (shared data); `write_rows` copies on write if shared.
/// `f32` for fast precision, `i32` words for exact precision.
#[derive(Clone)]
pub struct CpuTensor<T = f32> {
    shape: Vec<usize>,
    data: Arc<Vec<T>>,
}

impl<T> CpuTensor<T> {
    /// The same values (shared, not copied) under another shape with as many of them.
    pub(crate) fn reshaped(&self, shape: &[usize]) -> Result<Self> {
        check_reshape(&self.shape, shape)?;
        Ok(Self {
            shape: shape.to_vec(),
            data: Arc::clone(&self.data),
        })
    }
}

impl<T> std::fmt::Debug for CpuTensor<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CpuTensor{:?}", self.shape)
    }
}

impl<T: Copy> CpuTensor<T> {
    pub(crate) fn new(shape: Vec<usize>, data: Vec<T>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self {
            shape,
            data: Arc::new(data),
        }
    }
    pub fn data(&self) -> &[T] {
        &self.data
    }

    /// Overwrites rows `[row, row + src.rows)`; copies the data first if it is shared.
    pub(crate) fn write_rows(&mut self, row: usize, src: &Self) -> Result<()> {
        let (n, cols) = check_write_rows(&self.shape, row, &src.shape)?;
        Arc::make_mut(&mut self.data)[row * cols..(row + n) * cols].copy_from_slice(&src.data);
        Ok(())
    }

    pub(crate) fn slice_rows(&self, start: usize, count: usize) -> Result<Self> {
        let cols = check_slice_rows(&self.shape, start, count)?;
        Ok(Self::new(
            vec![count, cols],
            self.data[start * cols..(start + count) * cols].to_vec(),
        ))
    }

    /// Rows picked by `ids`, each checked against the table's height.
    pub(crate) fn gather(&self, ids: &[u32]) -> Result<Self> {
        let (vocab, dim) = self.as_matrix();
        let mut out = Vec::with_capacity(ids.len() * dim);
        for &id in ids {
            let id = id as usize;
            if id >= vocab {
                return Err(shape_err(
                    "embedding",
                    format!("token id {id} outside vocabulary of {vocab}"),
                ));
            }
            out.extend_from_slice(&self.data[id * dim..(id + 1) * dim]);
        }
        Ok(Self::new(vec![ids.len(), dim], out))
    }
}

impl<T> Shaped for CpuTensor<T> {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
}

/// Strided matrix view for [`gemm`]: element `(i, j)` is at `data[i * row + j * col]`.
#[derive(Clone, Copy)]
struct Strides {
    row: usize,
    col: usize,
}

/// `c = a · b + beta·c` with `a: m×k`, `b: k×n`, `c: m×n`, each with its own strides.
/// Bounds are checked here so the unsafe SGEMM call below can never read or write outside
/// the slices.
#[allow(clippy::too_many_arguments)]
fn gemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    sa: Strides,
    b: &[f32],
    sb: Strides,
    beta: f32,
    c: &mut [f32],
    sc: Strides,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, s: Strides| (rows - 1) * s.row + (cols - 1) * s.col;
    assert!(
        k == 0 || (last(m, k, sa) < a.len() && last(k, n, sb) < b.len()),
        "gemm operand out of bounds"
    );
    assert!(last(m, n, sc) < c.len(), "gemm output out of bounds");
    // SAFETY: the asserts above prove that every index the kernel touches, `i*row + j*col` for
    // i < rows and j < cols of each operand, lies inside its slice; `c` is a unique borrow and
    // distinct from `a` and `b`; strides fit in isize because the slices' lengths do.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            sa.row as isize,
            sa.col as isize,
            b.as_ptr(),
            sb.row as isize,
            sb.col as isize,
            beta,
            c.as_mut_ptr(),
            sc.row as isize,
            sc.col as isize,
        );
    }
}

/// Runs `f` compiled for the widest vector unit this CPU has (AVX-512, else AVX2 + FMA), so that
/// the plain chunked loops of this file (see [`dot`], [`softmax_numerators`] and `ops`) become vector
/// code. `f` must be small enough to inline, which every caller here is: one call site each.
#[inline(always)]
pub(crate) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above), the only requirement of
            // the target_feature function; `f` itself is safe code.
            return unsafe { run_avx512(f) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: AVX2 and FMA are present (checked just above); `f` is safe code.
            return unsafe { run_avx2(f) };
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn run_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Up to this many rows, `linear` streams the weights once with dot products instead of calling
/// SGEMM, which would first pack the whole weight matrix (decoding is one row per token).
const MATVEC_MAX_ROWS: usize = 4;

/// `out[r, j] += x[r] · w[j]` for every row `r` of `x` and row `j` of `w` (both `k` wide).
fn matvec(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    if k == 0 {
        return;
    }
    let n = w.len() / k;
    vectorized(
        #[inline(always)]
        || {
            for (row, out_row) in x.chunks_exact(k).zip(out.chunks_exact_mut(n.max(1))) {
                for (wj, o) in w.chunks_exact(k).zip(out_row.iter_mut()) {
                    *o += dot(row, wj);
                }
            }
        },
    )
}

/// `v = f(v)` for every value, vectorised: the `f`s of `ops` are branch-free, so the loop runs a
/// full vector of lanes at a time.
fn map_in_place(values: &mut [f32], f: impl Fn(f32) -> f32 + Copy) {
    vectorized(
        #[inline(always)]
        || {
            let mut chunks = values.chunks_exact_mut(LANES);
            for c in &mut chunks {
                for v in c.iter_mut() {
                    *v = f(*v);
                }
            }
            for v in chunks.into_remainder() {
                *v = f(*v);
            }
        },
    )
}

/// Partial sums and chunks of the vectorised loops in this file: a 512-bit vector of f32.
const LANES: usize = 16;

/// The unnormalised half of a softmax, in place: `row[..visible]` becomes
/// `exp(scale · row − max)` and the masked tail becomes 0 (`visible` ≥ 1); returns
/// `1 / Σ row`, which the caller applies to the (much smaller) `P · V` product instead of to
/// every probability. Max, exponentials and sum run over sixteen lanes (a scalar running sum
/// would keep the loop from vectorising); the masked tail takes part as −∞, which keeps a row
/// that is a whole number of vectors free of a scalar remainder loop, and whose exponential (at
/// most 1.7e-38 after `ops::exp`'s clamp) vanishes in a sum that is ≥ 1.
#[inline(always)]
fn softmax_numerators(row: &mut [f32], visible: usize, scale: f32) -> f32 {
    row[visible..].fill(f32::NEG_INFINITY);
    let live = &mut *row;
    let mut maxes = [f32::NEG_INFINITY; LANES];
    let mut chunks = live.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            maxes[i] = maxes[i].max(c[i]);
        }
    }
    // scale > 0 and rounding is monotonic, so max(s) · scale is exactly max(s · scale).
    let max = chunks
        .remainder()
        .iter()
        .chain(&maxes)
        .fold(f32::NEG_INFINITY, |m, &s| m.max(s))
        * scale;
    let mut sums = [0.0f32; LANES];
    let mut chunks = live.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            c[i] = ops::exp(c[i] * scale - max);
            sums[i] += c[i];
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for s in chunks.into_remainder() {
        *s = ops::exp(*s * scale - max);
        sum += *s;
    }
    row[visible..].fill(0.0);
    1.0 / sum
}

/// `Σ f(v)` over `values` with sixteen independent partial sums, so that the loop vectorises
/// (f32 addition is not reassociated on its own).
#[inline(always)]
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += f(c[i]);
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().map(|&v| f(v)).sum::<f32>()
}

/// `a · b` with sixteen independent partial sums, so the compiler can keep them in vector
/// registers (f32 addition is not reassociated on its own).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let len = a.len().min(b.len());
    let split = len - len % LANES;
    let mut acc = [0.0f32; LANES];
    for (x, y) in a[..split]
        .chunks_exact(LANES)
        .zip(b[..split].chunks_exact(LANES))
    {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = a[split..len]
        .iter()
        .zip(&b[split..len])
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// Up to this many query rows, attention computes its two products with direct loops: SGEMM's
/// packing costs more than the arithmetic for a head of a short text or one decoding step.
const DIRECT_ATTENTION_ROWS: usize = 32;

/// Query rows that the direct attention loops handle together: each adds an independent chain
/// of multiply-adds, which hides their latency (one row alone waits on every add).
const QUERY_BLOCK: usize = 4;

/// Scores of `R` (1 or [`QUERY_BLOCK`]) query rows, at `q[q_at + r·qw ..][..d]`, against every
/// key, from the head's `Kᵀ` (`d` rows of `stride` keys, `stride` a whole number of vectors),
/// into `out` (`R` rows of `stride`). The accumulators are separate arrays (not an array of
/// arrays), which is what lets the compiler keep each in one vector register.
#[inline(always)]
fn scores_block<const R: usize>(
    q: &[f32],
    q_at: usize,
    qw: usize,
    d: usize,
    k_t: &[f32],
    stride: usize,
    out: &mut [f32],
) {
    let row = |r: usize| &q[q_at + r.min(R - 1) * qw..][..d];
    let (q0, q1, q2, q3) = (row(0), row(1), row(2), row(3));
    for j0 in (0..stride).step_by(LANES) {
        let (mut a0, mut a1, mut a2, mut a3) =
            ([0.0f32; LANES], [0.0; LANES], [0.0; LANES], [0.0; LANES]);
        for c in 0..d {
            let keys: &[f32; LANES] = k_t[c * stride + j0..][..LANES]
                .try_into()
                .expect("one vector");
            let x0 = q0[c];
            for l in 0..LANES {
                a0[l] += x0 * keys[l];
            }
            if R == QUERY_BLOCK {
                let (x1, x2, x3) = (q1[c], q2[c], q3[c]);
                for l in 0..LANES {
                    a1[l] += x1 * keys[l];
                    a2[l] += x2 * keys[l];
                    a3[l] += x3 * keys[l];
                }
            }
        }
        for (r, acc) in [a0, a1, a2, a3].iter().take(R).enumerate() {
            out[r * stride + j0..][..LANES].copy_from_slice(acc);
        }
    }
}

/// `out_r = inv_r · Σ_j p_rj · v_j` for `R` (1 or [`QUERY_BLOCK`]) rows of softmax numerators
/// (`probs`, rows of `stride` with `kv_len` live) and their normalisers `inv`, a vector of the
/// head's `d` columns at a time, written to `out[r·qw ..][..d]`. Accumulators as in
/// [`scores_block`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn values_block<const R: usize>(
    probs: &[f32],
    inv: &[f32],
    stride: usize,
    kv_len: usize,
    v: &[f32],
    kv_at: usize,
    kvw: usize,
    d: usize,
    out: &mut [f32],
    qw: usize,
) {
    let row = |r: usize| &probs[r.min(R - 1) * stride..][..kv_len];
    let (p0, p1, p2, p3) = (row(0), row(1), row(2), row(3));
    let vector_cols = d - d % LANES;
    for c0 in (0..vector_cols).step_by(LANES) {
        let (mut a0, mut a1, mut a2, mut a3) =
            ([0.0f32; LANES], [0.0; LANES], [0.0; LANES], [0.0; LANES]);
        for j in 0..kv_len {
            let vj: &[f32; LANES] = v[kv_at + j * kvw + c0..][..LANES]
                .try_into()
                .expect("one vector");
            let x0 = p0[j];
            for l in 0..LANES {
                a0[l] += x0 * vj[l];
            }
            if R == QUERY_BLOCK {
                let (x1, x2, x3) = (p1[j], p2[j], p3[j]);
                for l in 0..LANES {
                    a1[l] += x1 * vj[l];
                    a2[l] += x2 * vj[l];
                    a3[l] += x3 * vj[l];
                }
            }
        }
        for (r, acc) in [a0, a1, a2, a3].iter().take(R).enumerate() {
            let o = &mut out[r * qw + c0..][..LANES];
            o.iter_mut().zip(acc).for_each(|(o, &a)| *o = a * inv[r]);
        }
    }
    for c in vector_cols..d {
        for (r, p_r) in [p0, p1, p2, p3].iter().take(R).enumerate() {
            let sum: f32 = p_r
                .iter()
                .enumerate()
                .map(|(j, &pj)| pj * v[kv_at + j * kvw + c])
                .sum();
            out[r * qw + c] = sum * inv[r];
        }
    }
}

/// The body of [`CpuBackend::attention`] on validated shapes, writing into `out`
/// (`batch·q_len × heads·head_dim`, zeroed).
#[inline(always)]
fn attention_into(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    kv_lens: &[u32],
    p: &AttentionParams,
    out: &mut [f32],
) {
    let (qw, kvw, d) = (p.heads * p.head_dim, p.kv_heads * p.head_dim, p.head_dim);
    let group = p.heads / p.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let direct = p.q_len <= DIRECT_ATTENTION_ROWS;
    let padded_rows = p.kv_rows.next_multiple_of(LANES);
    let mut scores = vec![0.0f32; p.q_len * padded_rows];
    let mut k_t = vec![0.0f32; if direct { d * padded_rows } else { 0 }];
    let mut inv_sums = vec![0.0f32; p.q_len];
    for (b, &kv_len) in kv_lens.iter().enumerate() {
        let kv_len = kv_len as usize;
        for h in 0..p.heads {
            let kvh = h / group;
            let q_at = b * p.q_len * qw + h * d;
            let kv_at = b * p.kv_rows * kvw + kvh * d;
            // Score rows of the direct path are padded to whole vectors (the padding is masked).
            let stride = if direct {
                kv_len.next_multiple_of(LANES)
            } else {
                kv_len
            };
            if direct {
                // Kᵀ of this head, so that each query's scores grow by whole-row multiply-adds
                // (one dot product per score would end in a horizontal sum every time).
                let k_t = &mut k_t[..d * stride];
                k_t.fill(0.0);
                for j in 0..kv_len {
                    let kj = &k[kv_at + j * kvw..kv_at + j * kvw + d];
                    for (c, &kc) in kj.iter().enumerate() {
                        k_t[c * stride + j] = kc;
                    }
                }
                let mut i = 0;
                while i + QUERY_BLOCK <= p.q_len {
                    let rows = &mut scores[i * stride..(i + QUERY_BLOCK) * stride];
                    scores_block::<QUERY_BLOCK>(q, q_at + i * qw, qw, d, k_t, stride, rows);
                    i += QUERY_BLOCK;
                }
                for i in i..p.q_len {
                    let row = &mut scores[i * stride..(i + 1) * stride];
                    scores_block::<1>(q, q_at + i * qw, qw, d, k_t, stride, row);
                }
            } else {
                // scores = Q_h · K_hᵀ, one row per query, read straight out of the packed rows.
                gemm(
                    p.q_len,
                    d,
                    kv_len,
                    &q[q_at..],
                    Strides { row: qw, col: 1 },
                    &k[kv_at..],
                    Strides { row: 1, col: kvw },
                    0.0,
                    &mut scores,
                    Strides {
                        row: kv_len,
                        col: 1,
                    },
                );
            }
            for (i, (row, inv)) in scores[..p.q_len * stride]
                .chunks_exact_mut(stride)
                .zip(inv_sums.iter_mut())
                .enumerate()
            {
                let visible = if p.causal {
                    (p.pos_offset + i + 1).min(kv_len)
                } else {
                    kv_len
                };
                // Keys before a sliding window weigh nothing (exp(-inf) = 0).
                let first = p.first_visible(p.pos_offset + i).min(visible - 1);
                row[..first].fill(f32::NEG_INFINITY);
                *inv = softmax_numerators(row, visible, scale);
            }
            if direct {
                let mut i = 0;
                while i + QUERY_BLOCK <= p.q_len {
                    let probs = &scores[i * stride..(i + QUERY_BLOCK) * stride];
                    let inv = &inv_sums[i..i + QUERY_BLOCK];
                    let rows = &mut out[q_at + i * qw..];
                    values_block::<QUERY_BLOCK>(
                        probs, inv, stride, kv_len, v, kv_at, kvw, d, rows, qw,
                    );
                    i += QUERY_BLOCK;
                }
                for i in i..p.q_len {
                    let probs = &scores[i * stride..(i + 1) * stride];
                    let inv = &inv_sums[i..i + 1];
                    let rows = &mut out[q_at + i * qw..];
                    values_block::<1>(probs, inv, stride, kv_len, v, kv_at, kvw, d, rows, qw);
                }
            } else {
                // out_h = P · V_h, written into the head's columns of the output rows.
                gemm(
                    p.q_len,
                    kv_len,
                    d,
                    &scores,
                    Strides {
                        row: kv_len,
                        col: 1,
                    },
                    &v[kv_at..],
                    Strides { row: kvw, col: 1 },
                    0.0,
                    &mut out[q_at..],
                    Strides { row: qw, col: 1 },
                );
                for (i, &inv) in inv_sums.iter().enumerate() {
                    let at = q_at + i * qw;
                    out[at..at + d].iter_mut().for_each(|o| *o *= inv);
                }
            }
        }
    }
}

/// The CPU backend. Stateless; single-threaded (callers parallelise across units).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    fn map(&self, x: &CpuTensor, f: impl Fn(f32) -> f32 + Copy) -> CpuTensor {
        let mut out = x.data.to_vec();
        map_in_place(&mut out, f);
        CpuTensor::new(x.shape.clone(), out)
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;

    fn describe(&self) -> String {
        "cpu".to_string()
    }

    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<CpuTensor> {
        if shape.iter().product::<usize>() != data.len() {
            return Err(shape_err(
                "upload",
                format!("{} values for shape {shape:?}", data.len()),
            ));
        }
        Ok(CpuTensor::new(shape.to_vec(), data.to_vec()))
    }

    fn zeros(&self, shape: &[usize]) -> Result<CpuTensor> {
        Ok(CpuTensor::new(
            shape.to_vec(),
            vec![0.0; shape.iter().product()],
        ))
    }

    async fn read(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        Ok(t.data.to_vec())
    }

    fn linear(&self, x: &CpuTensor, w: &CpuTensor, b: Option<&CpuTensor>) -> Result<CpuTensor> {
        let (m, k, n) = check_linear(&x.shape, &w.shape, b.map(|b| b.shape()))?;
        let mut out = match b {
            Some(b) => b.data.repeat(m),
            None => vec![0.0; m * n],
        };
        if m <= MATVEC_MAX_ROWS {
            matvec(&x.data, &w.data, k, &mut out);
            return Ok(CpuTensor::new(vec![m, n], out));
        }
        let beta = if b.is_some() { 1.0 } else { 0.0 };
        // wᵀ is read in place: element (kk, j) of wᵀ is w[j * k + kk].
        gemm(
            m,
            k,
            n,
            &x.data,
            Strides { row: k, col: 1 },
            &w.data,
            Strides { row: 1, col: k },
            beta,
            &mut out,
            Strides { row: n, col: 1 },
        );
        Ok(CpuTensor::new(vec![m, n], out))
    }

    fn add(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        check_same("add", &a.shape, &b.shape)?;
        let mut out = vec![0.0f32; a.data.len()];
        vectorized(
            #[inline(always)]
            || {
                for (o, (x, y)) in out.iter_mut().zip(a.data.iter().zip(b.data.iter())) {
                    *o = x + y;
                }
            },
        );
        Ok(CpuTensor::new(a.shape.clone(), out))
    }

    fn layer_norm(
        &self,
        x: &CpuTensor,
        gamma: &CpuTensor,
        beta: &CpuTensor,
        eps: f32,
    ) -> Result<CpuTensor> {
        let (_, cols) = x.as_matrix();
        check_same("layer_norm", &gamma.shape, &[cols])?;
        check_same("layer_norm", &beta.shape, &[cols])?;
        let mut out = vec![0.0f32; x.numel()];
        vectorized(
            #[inline(always)]
            || {
                for (row, out) in x.data.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
                    let mean = lane_sum(row, |v| v) / cols as f32;
                    let var = lane_sum(row, |v| (v - mean) * (v - mean)) / cols as f32;
                    let inv = 1.0 / (var + eps).sqrt();
                    for (o, (v, (g, b))) in out
                        .iter_mut()
                        .zip(row.iter().zip(gamma.data.iter().zip(beta.data.iter())))
                    {
                        *o = (v - mean) * inv * g + b;
                    }
                }
            },
        );
        Ok(CpuTensor::new(x.shape.clone(), out))
    }

    fn rms_norm(&self, x: &CpuTensor, gamma: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        let (_, cols) = x.as_matrix();
        check_same("rms_norm", &gamma.shape, &[cols])?;
        let mut out = vec![0.0f32; x.numel()];
        vectorized(
            #[inline(always)]
            || {
                for (row, out) in x.data.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
                    let ms = lane_sum(row, |v| v * v) / cols as f32;
                    let inv = 1.0 / (ms + eps).sqrt();
                    for (o, (v, g)) in out.iter_mut().zip(row.iter().zip(gamma.data.iter())) {
                        *o = v * inv * g;
                    }
                }
            },
        );
        Ok(CpuTensor::new(x.shape.clone(), out))
    }

    fn gelu(&self, x: &CpuTensor) -> Result<CpuTensor> {
        Ok(self.map(x, ops::gelu))
    }

    fn linear_gelu(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        b: Option<&CpuTensor>,
    ) -> Result<CpuTensor> {
        let mut y = self.linear(x, w, b)?;
        // The product was just allocated, so it is not shared and `make_mut` does not copy.
        map_in_place(Arc::make_mut(&mut y.data).as_mut_slice(), ops::gelu);
        Ok(y)
    }

    fn silu_mul(&self, gate: &CpuTensor, up: &CpuTensor) -> Result<CpuTensor> {
        check_same("silu_mul", &gate.shape, &up.shape)?;
        Ok(CpuTensor::new(
            gate.shape.clone(),
            gate.data
                .iter()
                .zip(up.data.iter())
                .map(|(&g, &u)| ops::silu(g) * u)
                .collect(),
        ))
    }

    fn gelu_tanh_mul(&self, gate: &CpuTensor, up: &CpuTensor) -> Result<CpuTensor> {
        check_same("gelu_tanh_mul", &gate.shape, &up.shape)?;
        Ok(CpuTensor::new(
            gate.shape.clone(),
            gate.data
                .iter()
                .zip(up.data.iter())
                .map(|(&g, &u)| ops::gelu_tanh(g) * u)
                .collect(),
        ))
    }

    fn scale(&self, x: &CpuTensor, s: f32) -> Result<CpuTensor> {
        Ok(self.map(x, move |v| v * s))
    }

    fn reshape(&self, x: &CpuTensor, shape: &[usize]) -> Result<CpuTensor> {
        x.reshaped(shape)
    }

    fn embedding(&self, table: &CpuTensor, ids: &[u32]) -> Result<CpuTensor> {
        table.gather(ids)
    }

    fn rope(
        &self,
        x: &CpuTensor,
        head_dim: usize,
        pos_offset: usize,
        freqs: &[f32],
    ) -> Result<CpuTensor> {
        check_rope(&x.shape, head_dim, freqs)?;
        let (_, cols) = x.as_matrix();
        let mut out = x.data.to_vec();
        for (r, row) in out.chunks_exact_mut(cols).enumerate() {
            let pos = (pos_offset + r) as f32;
            for head in row.chunks_exact_mut(head_dim) {
                for (i, &freq) in freqs.iter().enumerate() {
                    let (sin, cos) = (pos * freq).sin_cos();
                    let (a, b) = (head[2 * i], head[2 * i + 1]);
                    head[2 * i] = a * cos - b * sin;
                    head[2 * i + 1] = a * sin + b * cos;
                }
            }
        }
        Ok(CpuTensor::new(x.shape.clone(), out))
    }

    fn attention(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        kv_lens: &[u32],
        p: &AttentionParams,
    ) -> Result<CpuTensor> {
        p.validate(&q.shape, &k.shape, &v.shape, kv_lens)?;
        let qw = p.heads * p.head_dim;
        let mut out = vec![0.0f32; p.batch * p.q_len * qw];
        vectorized(
            #[inline(always)]
            || attention_into(&q.data, &k.data, &v.data, kv_lens, p, &mut out),
        );
        Ok(CpuTensor::new(vec![p.batch * p.q_len, qw], out))
    }

    fn write_rows(&self, dst: &mut CpuTensor, row: usize, src: &CpuTensor) -> Result<()> {
        dst.write_rows(row, src)
    }

    fn slice_rows(&self, x: &CpuTensor, start: usize, count: usize) -> Result<CpuTensor> {
        x.slice_rows(start, count)
    }

    fn mean_pool(&self, x: &CpuTensor, seq: usize, lens: &[u32]) -> Result<CpuTensor> {
        let (batch, dim) = check_pool(&x.shape, seq, lens)?;
        let mut out = vec![0.0f32; batch * dim];
        for (b, acc) in out.chunks_exact_mut(dim).enumerate() {
            let len = lens[b] as usize;
            for row in x.data[b * seq * dim..].chunks_exact(dim).take(len) {
                acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
            }
            acc.iter_mut().for_each(|a| *a /= len as f32);
        }
        Ok(CpuTensor::new(vec![batch, dim], out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With a window of `w`, a query sees exactly its own position and the `w - 1` before.
    #[test]
    fn a_sliding_window_hides_keys_before_it() {
        let b = CpuBackend;
        // One head of 1 value; key j is 0 (all scores equal), value j is j.
        let n = 6;
        let q = b.upload(&vec![1.0; n], &[n, 1]).unwrap();
        let k = b.upload(&vec![0.0; n], &[n, 1]).unwrap();
        let v: Vec<f32> = (0..n).map(|j| j as f32).collect();
        let v = b.upload(&v, &[n, 1]).unwrap();
        let params = |window| AttentionParams {
            batch: 1,
            q_len: n,
            kv_rows: n,
            heads: 1,
            kv_heads: 1,
            head_dim: 1,
            causal: true,
            pos_offset: 0,
            window,
        };
        let run = |window| {
            b.attention(&q, &k, &v, &[n as u32], &params(window))
                .unwrap()
        };
        // Uniform weights: the mean of the visible values.
        let mean = |lo: usize, hi: usize| (lo..=hi).sum::<usize>() as f32 / (hi - lo + 1) as f32;
        let windowed = run(Some(3));
        let full = run(None);
        for i in 0..n {
            assert!((windowed.data()[i] - mean(i.saturating_sub(2), i)).abs() < 1e-6);
            assert!((full.data()[i] - mean(0, i)).abs() < 1e-6);
        }
        assert_eq!(
            run(Some(1)).data(),
            v.data(),
            "a window of one sees itself only"
        );
        assert!(
            b.attention(&q, &k, &v, &[n as u32], &params(Some(0)))
                .is_err(),
            "an empty window is refused"
        );
    }

    fn t(data: &[f32], shape: &[usize]) -> CpuTensor {
        CpuBackend.upload(data, shape).unwrap()
    }

    #[test]
    fn linear_matches_hand_computation() {
        let x = t(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
        let w = t(&[1.0, 0.0, 1.0, 1.0, 0.5, -1.0], &[3, 2]);
        let b = t(&[0.0, 1.0, 10.0], &[3]);
        let y = CpuBackend.linear(&x, &w, Some(&b)).unwrap();
        assert_eq!(y.data(), &[1.0, 4.0, 8.5, 3.0, 8.0, 7.5]);
        assert!(CpuBackend.linear(&x, &t(&[1.0; 6], &[2, 3]), None).is_err());
    }

    #[test]
    fn causal_attention_first_query_sees_only_first_key() {
        let p = AttentionParams {
            batch: 1,
            q_len: 2,
            kv_rows: 4,
            heads: 2,
            kv_heads: 1,
            head_dim: 2,
            causal: true,
            pos_offset: 0,
            window: None,
        };
        let q = t(&[1.0; 8], &[2, 4]);
        let k = t(&[1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 9.0, 9.0], &[4, 2]);
        let v = t(&[1.0, 2.0, 3.0, 4.0, 100.0, 100.0, 100.0, 100.0], &[4, 2]);
        let out = CpuBackend.attention(&q, &k, &v, &[2], &p).unwrap();
        // Query 0 sees key 0 only; both heads share the single KV head.
        assert_eq!(&out.data()[..4], &[1.0, 2.0, 1.0, 2.0]);
        // Query 1 sees keys 0 and 1 with equal scores: the average.
        assert_eq!(&out.data()[4..], &[2.0, 3.0, 2.0, 3.0]);
    }

    /// Attention by the textbook formula, one score at a time.
    fn naive_attention(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        lens: &[u32],
        p: &AttentionParams,
    ) -> Vec<f32> {
        let (qw, kvw, d) = (p.heads * p.head_dim, p.kv_heads * p.head_dim, p.head_dim);
        let mut out = vec![0.0f32; p.batch * p.q_len * qw];
        for (b, &len) in lens.iter().enumerate() {
            for h in 0..p.heads {
                let kvh = h / (p.heads / p.kv_heads);
                for i in 0..p.q_len {
                    let visible = if p.causal {
                        (p.pos_offset + i + 1).min(len as usize)
                    } else {
                        len as usize
                    };
                    let qi = &q[(b * p.q_len + i) * qw + h * d..][..d];
                    let scores: Vec<f32> = (0..visible)
                        .map(|j| {
                            let kj = &k[(b * p.kv_rows + j) * kvw + kvh * d..][..d];
                            qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() / (d as f32).sqrt()
                        })
                        .collect();
                    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                    let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f32 = e.iter().sum();
                    for c in 0..d {
                        out[(b * p.q_len + i) * qw + h * d + c] = (0..visible)
                            .map(|j| e[j] / sum * v[(b * p.kv_rows + j) * kvw + kvh * d + c])
                            .sum();
                    }
                }
            }
        }
        out
    }

    #[test]
    fn attention_matches_the_textbook_formula_on_every_path() {
        // Query lengths on both sides of the direct-loop limit and of the query blocks; head
        // sizes with and without a partial vector; grouped heads; causal with an offset.
        let mut seed = 1u32;
        let mut random = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0
        };
        for (q_len, kv_rows, head_dim, heads, kv_heads, causal, pos_offset) in [
            (1, 40, 64, 4, 2, true, 39),
            (3, 3, 32, 2, 2, false, 0),
            (5, 21, 20, 3, 1, true, 16),
            (9, 9, 32, 2, 2, true, 0),
            (32, 33, 16, 2, 1, false, 0),
            (40, 40, 24, 2, 2, true, 0),
        ] {
            let p = AttentionParams {
                batch: 2,
                q_len,
                kv_rows,
                heads,
                kv_heads,
                head_dim,
                causal,
                pos_offset,
                window: None,
            };
            let q: Vec<f32> = (0..2 * q_len * heads * head_dim)
                .map(|_| random() * 3.0)
                .collect();
            let k: Vec<f32> = (0..2 * kv_rows * kv_heads * head_dim)
                .map(|_| random() * 3.0)
                .collect();
            let v: Vec<f32> = (0..2 * kv_rows * kv_heads * head_dim)
                .map(|_| random())
                .collect();
            let lens = [
                kv_rows as u32,
                kv_rows
                    .div_ceil(2)
                    .max(if causal { pos_offset + q_len } else { 1 })
                    .min(kv_rows) as u32,
            ];
            let got = CpuBackend
                .attention(
                    &t(&q, &[2 * q_len, heads * head_dim]),
                    &t(&k, &[2 * kv_rows, kv_heads * head_dim]),
                    &t(&v, &[2 * kv_rows, kv_heads * head_dim]),
                    &lens,
                    &p,
                )
                .unwrap();
            let want = naive_attention(&q, &k, &v, &lens, &p);
            let worst = got
                .data()
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(
                worst < 1e-5,
                "q_len {q_len} head_dim {head_dim}: off by {worst}"
            );
        }
    }

    #[test]
    fn write_rows_rejects_overflow() {
        let mut dst = CpuBackend.zeros(&[2, 3]).unwrap();
        let src = t(&[1.0; 6], &[2, 3]);
        assert!(CpuBackend.write_rows(&mut dst, 1, &src).is_err());
        CpuBackend.write_rows(&mut dst, 0, &src).unwrap();
        assert_eq!(dst.data(), &[1.0; 6]);
    }
}
