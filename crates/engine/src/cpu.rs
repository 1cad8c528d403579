//! The CPU reference backend: plain Rust loops plus `matrixmultiply`'s SIMD SGEMM for every
//! matrix product (linear layers and both attention products).

use std::sync::Arc;

use crate::{
    AttentionParams, Backend, Result, Shaped, check_linear, check_pool, check_rope, check_same,
    check_slice_rows, check_write_rows, ops, shape_err,
};

/// A host tensor. Cloning is cheap (shared data); `write_rows` copies on write if shared.
/// `f32` for fast precision, `i32` words for exact precision.
#[derive(Clone)]
pub struct CpuTensor<T = f32> {
    shape: Vec<usize>,
    data: Arc<Vec<T>>,
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

/// Up to this many rows, `linear` streams the weights once with dot products instead of calling
/// SGEMM, which would first pack the whole weight matrix (decoding is one row per token).
const MATVEC_MAX_ROWS: usize = 4;

/// `out[r, j] += x[r] · w[j]` for every row `r` of `x` and row `j` of `w` (both `k` wide).
fn matvec(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    if k == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above), which is all the
        // target_feature function requires; it only reads and writes through safe slices.
        unsafe { matvec_avx2(x, w, k, out) };
        return;
    }
    matvec_generic(x, w, k, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn matvec_avx2(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    matvec_generic(x, w, k, out);
}

#[inline(always)]
fn matvec_generic(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    let n = w.len() / k.max(1);
    for (row, out_row) in x.chunks_exact(k).zip(out.chunks_exact_mut(n.max(1))) {
        for (wj, o) in w.chunks_exact(k).zip(out_row.iter_mut()) {
            *o += dot(row, wj);
        }
    }
}

/// `out[i] = f(x[i])`, compiled for AVX2 when the CPU has it so that branch-free `f`s (see
/// `ops`) run eight lanes at a time.
fn map_into(x: &[f32], out: &mut [f32], f: impl Fn(f32) -> f32 + Copy) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA are present (checked just above); the function only uses safe
        // slice code.
        unsafe { map_into_avx2(x, out, f) };
        return;
    }
    map_into_generic(x, out, f);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn map_into_avx2(x: &[f32], out: &mut [f32], f: impl Fn(f32) -> f32 + Copy) {
    map_into_generic(x, out, f);
}

#[inline(always)]
fn map_into_generic(x: &[f32], out: &mut [f32], f: impl Fn(f32) -> f32 + Copy) {
    const LANES: usize = 8;
    let split = x.len() - x.len() % LANES;
    for (o, v) in out[..split]
        .chunks_exact_mut(LANES)
        .zip(x[..split].chunks_exact(LANES))
    {
        for i in 0..LANES {
            o[i] = f(v[i]);
        }
    }
    for (o, &v) in out[split..].iter_mut().zip(&x[split..]) {
        *o = f(v);
    }
}

/// `a · b` with sixteen independent partial sums, so the compiler can keep them in vector
/// registers (f32 addition is not reassociated on its own).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
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

/// The CPU backend. Stateless; single-threaded (callers parallelise across units).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    fn map(&self, x: &CpuTensor, f: impl Fn(f32) -> f32 + Copy) -> CpuTensor {
        let mut out = vec![0.0; x.data.len()];
        map_into(&x.data, &mut out, f);
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
        Ok(CpuTensor::new(
            a.shape.clone(),
            a.data
                .iter()
                .zip(b.data.iter())
                .map(|(x, y)| x + y)
                .collect(),
        ))
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
        let mut out = Vec::with_capacity(x.numel());
        for row in x.data.chunks_exact(cols) {
            let mean = row.iter().sum::<f32>() / cols as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / cols as f32;
            let inv = 1.0 / (var + eps).sqrt();
            out.extend(
                row.iter()
                    .zip(gamma.data.iter().zip(beta.data.iter()))
                    .map(|(v, (g, b))| (v - mean) * inv * g + b),
            );
        }
        Ok(CpuTensor::new(x.shape.clone(), out))
    }

    fn rms_norm(&self, x: &CpuTensor, gamma: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        let (_, cols) = x.as_matrix();
        check_same("rms_norm", &gamma.shape, &[cols])?;
        let mut out = Vec::with_capacity(x.numel());
        for row in x.data.chunks_exact(cols) {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / cols as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            out.extend(row.iter().zip(gamma.data.iter()).map(|(v, g)| v * inv * g));
        }
        Ok(CpuTensor::new(x.shape.clone(), out))
    }

    fn gelu(&self, x: &CpuTensor) -> Result<CpuTensor> {
        Ok(self.map(x, ops::gelu))
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

    fn embedding(&self, table: &CpuTensor, ids: &[u32]) -> Result<CpuTensor> {
        table.gather(ids)
    }

    fn rope(
        &self,
        x: &CpuTensor,
        head_dim: usize,
        pos_offset: usize,
        theta: f32,
    ) -> Result<CpuTensor> {
        check_rope(&x.shape, head_dim)?;
        let (_, cols) = x.as_matrix();
        let mut out = x.data.to_vec();
        for (r, row) in out.chunks_exact_mut(cols).enumerate() {
            let pos = (pos_offset + r) as f32;
            for head in row.chunks_exact_mut(head_dim) {
                for i in 0..head_dim / 2 {
                    let freq = theta.powf(-2.0 * i as f32 / head_dim as f32);
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
        let (qw, kvw, d) = (p.heads * p.head_dim, p.kv_heads * p.head_dim, p.head_dim);
        let group = p.heads / p.kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0.0f32; p.batch * p.q_len * qw];
        let mut scores = vec![0.0f32; p.q_len * p.kv_rows];
        for (b, &kv_len) in kv_lens.iter().enumerate() {
            let kv_len = kv_len as usize;
            for h in 0..p.heads {
                let kvh = h / group;
                let q_at = b * p.q_len * qw + h * d;
                let kv_at = b * p.kv_rows * kvw + kvh * d;
                let direct = p.q_len <= DIRECT_ATTENTION_ROWS;
                if direct {
                    for i in 0..p.q_len {
                        let qi = &q.data[q_at + i * qw..q_at + i * qw + d];
                        for (j, s) in scores[i * kv_len..(i + 1) * kv_len].iter_mut().enumerate() {
                            *s = dot(qi, &k.data[kv_at + j * kvw..kv_at + j * kvw + d]);
                        }
                    }
                } else {
                    // scores = Q_h · K_hᵀ, one row per query, read straight out of the packed rows.
                    gemm(
                        p.q_len,
                        d,
                        kv_len,
                        &q.data[q_at..],
                        Strides { row: qw, col: 1 },
                        &k.data[kv_at..],
                        Strides { row: 1, col: kvw },
                        0.0,
                        &mut scores,
                        Strides {
                            row: kv_len,
                            col: 1,
                        },
                    );
                }
                for (i, row) in scores[..p.q_len * kv_len]
                    .chunks_exact_mut(kv_len)
                    .enumerate()
                {
                    let visible = if p.causal {
                        (p.pos_offset + i + 1).min(kv_len)
                    } else {
                        kv_len
                    };
                    let max = row[..visible]
                        .iter()
                        .fold(f32::NEG_INFINITY, |m, &s| m.max(s * scale));
                    let mut sum = 0.0;
                    for s in &mut row[..visible] {
                        *s = ops::exp(*s * scale - max);
                        sum += *s;
                    }
                    let inv = 1.0 / sum;
                    row[..visible].iter_mut().for_each(|s| *s *= inv);
                    row[visible..].iter_mut().for_each(|s| *s = 0.0);
                }
                if direct {
                    for i in 0..p.q_len {
                        let oi = &mut out[q_at + i * qw..q_at + i * qw + d];
                        for (j, &pij) in scores[i * kv_len..(i + 1) * kv_len].iter().enumerate() {
                            let vj = &v.data[kv_at + j * kvw..kv_at + j * kvw + d];
                            oi.iter_mut().zip(vj).for_each(|(o, v)| *o += pij * v);
                        }
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
                        &v.data[kv_at..],
                        Strides { row: kvw, col: 1 },
                        0.0,
                        &mut out[q_at..],
                        Strides { row: qw, col: 1 },
                    );
                }
            }
        }
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

    #[test]
    fn write_rows_rejects_overflow() {
        let mut dst = CpuBackend.zeros(&[2, 3]).unwrap();
        let src = t(&[1.0; 6], &[2, 3]);
        assert!(CpuBackend.write_rows(&mut dst, 1, &src).is_err());
        CpuBackend.write_rows(&mut dst, 0, &src).unwrap();
        assert_eq!(dst.data(), &[1.0; 6]);
    }
}
