//! Exact ops on the CPU: the reference implementation of the integer specification in
//! [`super`]. Integer arithmetic is exact, so SIMD (AVX2/AVX-512 here, simd128 in wasm) may
//! reorder sums freely without changing a bit.

use super::{
    ActTable, ExactBackend, GroupScale, NORM_FRAC, QActs, QMatrix, QNorm, RopeTable, ScoreScale,
    bit_len, check_act_table, check_attention_int, check_norm, check_qlinear, check_qmatrix,
    check_quantize, check_rope_int, div_round, exp2_neg_q15, isqrt, mul_shift, quantize_group,
    requantize, score, table_lookup, value_weight,
};
use crate::{
    AttentionParams, Result, Shaped, check_pool, check_same, cpu::CpuBackend, cpu::CpuTensor,
    shape_err,
};

pub type CpuInt = CpuTensor<i32>;

fn bytes(words: &[i32]) -> &[i8] {
    bytemuck::cast_slice(words)
}

fn scale_at(words: &[i32], index: usize) -> GroupScale {
    GroupScale {
        reduced: words[2 * index],
        shift: words[2 * index + 1],
    }
}

/// `Σ a[i] · b[i]` over int8 slices.
fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked just above); safe slice code only.
        return unsafe { dot_i8_avx2(a, b) };
    }
    #[cfg(all(target_arch = "wasm32", target_feature = "relaxed-simd"))]
    return dot_i8_relaxed(a, b);
    #[allow(unreachable_code)]
    dot_i8_generic(a, b)
}

/// [`dot_i8_generic`] with wasm relaxed SIMD, giving the same result on every engine.
///
/// `i32x4.relaxed_dot_i8x16_i7x16_add_s` is deterministic only when the second operand's bytes
/// have their top bit clear, so each weight byte is split as `w = lo - 128 · neg` with
/// `lo = w & 0x7f` and `neg` its sign bit, both in `0..=127`; the pairwise i16 sums then stay
/// within ±32 512, so no engine saturates or wraps them.
#[cfg(all(target_arch = "wasm32", target_feature = "relaxed-simd"))]
fn dot_i8_relaxed(a: &[i8], b: &[i8]) -> i32 {
    use core::arch::wasm32::*;
    let len = a.len().min(b.len());
    let split = len - len % 16;
    let mut low = i32x4_splat(0);
    let mut neg = i32x4_splat(0);
    for (x, w) in a[..split].chunks_exact(16).zip(b[..split].chunks_exact(16)) {
        // SAFETY: both chunks are exactly 16 bytes; `v128_load` has no alignment requirement.
        let (xv, wv) = unsafe { (v128_load(x.as_ptr().cast()), v128_load(w.as_ptr().cast())) };
        low = i32x4_relaxed_dot_i8x16_i7x16_add(xv, v128_and(wv, i8x16_splat(0x7f)), low);
        neg = i32x4_relaxed_dot_i8x16_i7x16_add(xv, u8x16_shr(wv, 7), neg);
    }
    let lanes = |v: v128| {
        i32x4_extract_lane::<0>(v)
            .wrapping_add(i32x4_extract_lane::<1>(v))
            .wrapping_add(i32x4_extract_lane::<2>(v))
            .wrapping_add(i32x4_extract_lane::<3>(v))
    };
    lanes(low)
        .wrapping_sub(lanes(neg).wrapping_mul(128))
        .wrapping_add(dot_i8_generic(&a[split..len], &b[split..len]))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn dot_i8_avx2(a: &[i8], b: &[i8]) -> i32 {
    dot_i8_generic(a, b)
}

/// A plain widening dot product: the compiler turns it into `pmaddwd` (x86) or
/// `i32x4.dot_i16x8_s` (wasm simd128) sums.
/// Wrapping on purpose: the spec's sums wrap, and overflow checks (debug builds) would keep the
/// loop scalar.
#[inline(always)]
fn dot_i8_generic(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).fold(0i32, |acc, (&x, &y)| {
        acc.wrapping_add(i32::from(x) * i32::from(y))
    })
}

/// Shapes and data of one [`ExactBackend::qlinear`] call.
struct QLinearJob<'a> {
    x: &'a [i8],
    x_scales: &'a [i32],
    w: &'a [i8],
    requant: &'a [i32],
    bias: Option<&'a [i32]>,
    k: usize,
    n: usize,
    group: usize,
    w_group: usize,
}

fn qlinear_rows(job: &QLinearJob<'_>, out: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked just above); the function only uses safe slices.
        unsafe { qlinear_rows_avx2(job, out) };
        return;
    }
    #[cfg(all(target_arch = "wasm32", target_feature = "relaxed-simd"))]
    return qlinear_rows_generic(job, out, |x, w, group, accs| {
        for (acc, (xg, wg)) in accs
            .iter_mut()
            .zip(x.chunks_exact(group).zip(w.chunks_exact(group)))
        {
            *acc = dot_i8_relaxed(xg, wg);
        }
    });
    #[allow(unreachable_code)]
    qlinear_rows_generic(job, out, group_dots_generic);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn qlinear_rows_avx2(job: &QLinearJob<'_>, out: &mut [i32]) {
    qlinear_rows_generic(job, out, |x, w, group, accs| {
        if group == 32 {
            // Safe to call: a closure inherits this function's AVX2 target feature.
            group_dots_32_avx2(x, w, accs)
        } else {
            group_dots_generic(x, w, group, accs)
        }
    });
}

/// `accs[g]` = the dot product of group `g` of `x` and `w`.
#[inline(always)]
fn group_dots_generic(x: &[i8], w: &[i8], group: usize, accs: &mut [i32]) {
    for (acc, (xg, wg)) in accs
        .iter_mut()
        .zip(x.chunks_exact(group).zip(w.chunks_exact(group)))
    {
        *acc = dot_i8_generic(xg, wg);
    }
}

/// [`group_dots_generic`] for groups of 32 with AVX2: each group is one 32-byte load per
/// operand widened to i16 and multiplied with `vpmaddwd` (exact for every int8 value), and eight
/// groups are reduced together by a tree of horizontal adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn group_dots_32_avx2(x: &[i8], w: &[i8], accs: &mut [i32]) {
    use std::arch::x86_64::*;
    let groups = accs.len().min(x.len() / 32).min(w.len() / 32);
    let mut g = 0;
    while g + 8 <= groups {
        let mut v = [_mm256_setzero_si256(); 8];
        for (j, vj) in v.iter_mut().enumerate() {
            let at = (g + j) * 32;
            let (xs, ws) = (&x[at..at + 32], &w[at..at + 32]);
            // SAFETY: `xs` and `ws` are 32-byte slices (bounds-checked just above) and
            // `loadu` has no alignment requirement.
            let (xa, wa) = unsafe {
                (
                    _mm256_loadu_si256(xs.as_ptr().cast()),
                    _mm256_loadu_si256(ws.as_ptr().cast()),
                )
            };
            let lo = _mm256_madd_epi16(
                _mm256_cvtepi8_epi16(_mm256_castsi256_si128(xa)),
                _mm256_cvtepi8_epi16(_mm256_castsi256_si128(wa)),
            );
            let hi = _mm256_madd_epi16(
                _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(xa)),
                _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(wa)),
            );
            *vj = _mm256_add_epi32(lo, hi);
        }
        let ab = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
        let cd = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
        let sums = _mm256_add_epi32(
            _mm256_permute2x128_si256::<0x20>(ab, cd),
            _mm256_permute2x128_si256::<0x31>(ab, cd),
        );
        let out = &mut accs[g..g + 8];
        // SAFETY: `out` is an 8-value (32-byte) slice; `storeu` has no alignment requirement.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), sums) };
        g += 8;
    }
    group_dots_generic(&x[g * 32..], &w[g * 32..], 32, &mut accs[g..]);
}

/// Every output: per activation group, an int8 dot product requantised to Fx, summed.
///
/// When every scale is in the range the quantiser produces (checked once per call, see
/// [`fast_requant_applies`]), requantisation takes a branch-free form of [`requantize`] that
/// gives the same bits and vectorises across groups; otherwise the general form runs.
#[inline(always)]
fn qlinear_rows_generic(
    job: &QLinearJob<'_>,
    out: &mut [i32],
    group_dots: impl Fn(&[i8], &[i8], usize, &mut [i32]),
) {
    let (k, group) = (job.k, job.group);
    let groups = k / group;
    let w_groups = k / job.w_group;
    let per_w = job.w_group / group;
    let fast = fast_requant_applies(job);
    // Where group g's weight scale sits in a row's (M, E) pairs.
    let w_index: Vec<usize> = (0..groups).map(|g| 2 * (g / per_w)).collect();
    let mut scales = Vec::with_capacity(groups);
    let mut reduced = vec![0u32; groups];
    let mut shifts = vec![0i32; groups];
    let mut accs = vec![0i32; groups];
    let mut mults = vec![0u32; groups];
    let mut exps = vec![0i32; groups];
    for (r, (xrow, orow)) in job
        .x
        .chunks_exact(k)
        .zip(out.chunks_exact_mut(job.n))
        .enumerate()
    {
        scales.clear();
        scales.extend((0..groups).map(|g| scale_at(job.x_scales, r * groups + g)));
        for (g, s) in scales.iter().enumerate() {
            reduced[g] = s.reduced as u32;
            shifts[g] = s.shift;
        }
        for (c, (wrow, o)) in job.w.chunks_exact(k).zip(orow.iter_mut()).enumerate() {
            let requant = &job.requant[2 * c * w_groups..2 * (c + 1) * w_groups];
            group_dots(xrow, wrow, group, &mut accs);
            let mut y = job.bias.map_or(0, |b| b[c]);
            if fast {
                if w_groups == 1 {
                    mults.fill(requant[0] as u32);
                    exps.fill(requant[1]);
                } else {
                    for (g, &at) in w_index.iter().enumerate() {
                        mults[g] = requant[at] as u32;
                        exps[g] = requant[at + 1];
                    }
                }
                for g in 0..groups {
                    y = y.wrapping_add(requantize_in_range(
                        accs[g], reduced[g], shifts[g], mults[g], exps[g],
                    ));
                }
            } else {
                for (g, (&acc, &at)) in accs.iter().zip(&w_index).enumerate() {
                    y = y.wrapping_add(requantize(acc, scales[g], requant[at], requant[at + 1]));
                }
            }
            *o = y;
        }
    }
}

/// Whether every scale of `job` is in the range where [`requantize_in_range`] equals
/// [`requantize`]: activation scales `reduced < 2^15`, `0 <= shift <= 17` (what
/// `quantize_group` produces), multipliers `0 <= M < 2^31`, and every final shift in `1..=62`.
fn fast_requant_applies(job: &QLinearJob<'_>) -> bool {
    let (mut min_shift, mut max_shift) = (i32::MAX, i32::MIN);
    for s in job.x_scales.chunks_exact(2) {
        if !(0..1 << 15).contains(&s[0]) {
            return false;
        }
        min_shift = min_shift.min(s[1]);
        max_shift = max_shift.max(s[1]);
    }
    if min_shift < 0 || max_shift > 17 {
        return min_shift == i32::MAX; // no rows at all
    }
    job.requant.chunks_exact(2).all(|r| {
        r[0] >= 0 && {
            let lo = i64::from(r[1]) - 15 - i64::from(max_shift);
            let hi = i64::from(r[1]) - 15 - i64::from(min_shift);
            lo >= 1 && hi <= 62
        }
    })
}

/// [`requantize`] for in-range scales (see [`fast_requant_applies`]), without branches.
#[inline(always)]
fn requantize_in_range(acc: i32, reduced: u32, shift: i32, mult: u32, exp: i32) -> i32 {
    // reduced < 2^15 and mult < 2^31: the rounded product fits 31 bits, as in `mul_shift`.
    let combined = (u64::from(reduced) * u64::from(mult) + (1 << 14)) >> 15;
    let s = (exp - 15 - shift) as u32;
    let magnitude = ((u64::from(acc.unsigned_abs()) * combined + (1u64 << (s - 1))) >> s)
        .min(i32::MAX as u64) as i32;
    if acc < 0 { -magnitude } else { magnitude }
}

impl ExactBackend for CpuBackend {
    type Int = CpuInt;

    fn upload_int(&self, data: &[i32], shape: &[usize]) -> Result<CpuInt> {
        if shape.iter().product::<usize>() != data.len() {
            return Err(shape_err(
                "upload_int",
                format!("{} values for shape {shape:?}", data.len()),
            ));
        }
        Ok(CpuInt::new(shape.to_vec(), data.to_vec()))
    }

    fn zeros_int(&self, shape: &[usize]) -> Result<CpuInt> {
        Ok(CpuInt::new(shape.to_vec(), vec![0; shape.iter().product()]))
    }

    async fn read_int(&self, t: &CpuInt) -> Result<Vec<i32>> {
        Ok(t.data().to_vec())
    }

    fn quantize(&self, x: &CpuInt, group: usize) -> Result<QActs<CpuInt>> {
        let (rows, cols) = check_quantize(x.shape(), group)?;
        let groups = rows * cols / group;
        let mut buf = vec![0i32; rows * cols / 4 + 2 * groups];
        let (data, scales) = buf.split_at_mut(rows * cols / 4);
        let data: &mut [i8] = bytemuck::cast_slice_mut(data);
        for (g, (src, dst)) in x
            .data()
            .chunks_exact(group)
            .zip(data.chunks_exact_mut(group))
            .enumerate()
        {
            let s = quantize_group(src, dst);
            scales[2 * g] = s.reduced;
            scales[2 * g + 1] = s.shift;
        }
        let len = buf.len();
        Ok(QActs {
            rows,
            cols,
            group,
            buf: CpuInt::new(vec![len], buf),
        })
    }

    fn qlinear(&self, x: &QActs<CpuInt>, w: &QMatrix<CpuInt>) -> Result<CpuInt> {
        check_qlinear(x, w)?;
        let (m, k, n) = (x.rows, x.cols, w.rows);
        let (xdata, x_scales) = x.buf.data().split_at(x.scales_offset());
        let job = QLinearJob {
            x: bytes(xdata),
            x_scales,
            w: bytes(w.data.data()),
            requant: w.requant.data(),
            bias: w.bias.as_ref().map(|b| b.data()),
            k,
            n,
            group: x.group,
            w_group: w.group,
        };
        let mut out = vec![0i32; m * n];
        qlinear_rows(&job, &mut out);
        Ok(CpuInt::new(vec![m, n], out))
    }

    fn qembedding(&self, table: &QMatrix<CpuInt>, ids: &[u32]) -> Result<CpuInt> {
        check_qmatrix("qembedding", table)?;
        let dim = table.cols;
        let data = bytes(table.data.data());
        let requant = table.requant.data();
        let mut out = Vec::with_capacity(ids.len() * dim);
        for &id in ids {
            let id = id as usize;
            if id >= table.rows {
                return Err(shape_err(
                    "qembedding",
                    format!("token id {id} outside vocabulary of {}", table.rows),
                ));
            }
            let blocks = dim / table.group;
            out.extend(
                data[id * dim..(id + 1) * dim]
                    .iter()
                    .enumerate()
                    .map(|(col, &q)| {
                        let at = 2 * (id * blocks + col / table.group);
                        mul_shift(i32::from(q), requant[at], requant[at + 1])
                    }),
            );
        }
        Ok(CpuInt::new(vec![ids.len(), dim], out))
    }

    fn gather_int(&self, table: &CpuInt, ids: &[u32]) -> Result<CpuInt> {
        table.gather(ids)
    }

    fn add_int(&self, a: &CpuInt, b: &CpuInt) -> Result<CpuInt> {
        check_same("add_int", a.shape(), b.shape())?;
        let out = a
            .data()
            .iter()
            .zip(b.data())
            .map(|(x, y)| x.wrapping_add(*y))
            .collect();
        Ok(CpuInt::new(a.shape().to_vec(), out))
    }

    fn mul_int(&self, a: &CpuInt, b: &CpuInt, shift: i32) -> Result<CpuInt> {
        check_same("mul_int", a.shape(), b.shape())?;
        let out = a
            .data()
            .iter()
            .zip(b.data())
            .map(|(x, y)| mul_shift(*x, *y, shift))
            .collect();
        Ok(CpuInt::new(a.shape().to_vec(), out))
    }

    fn norm_int(&self, x: &CpuInt, norm: &QNorm<CpuInt>, frac: u32) -> Result<CpuInt> {
        let (_, cols) = check_norm(x.shape(), norm)?;
        let gamma = norm.gamma.data();
        let beta = norm.beta.as_ref().map(|b| b.data());
        let mut out = vec![0i32; x.numel()];
        for (row, orow) in x.data().chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
            norm_row(row, gamma, beta, frac, orow);
        }
        Ok(CpuInt::new(x.shape().to_vec(), out))
    }

    fn act_int(&self, x: &CpuInt, table: &ActTable<CpuInt>) -> Result<CpuInt> {
        check_act_table(table)?;
        let t = table.table.data();
        let out = x
            .data()
            .iter()
            .map(|&v| table_lookup(v, t, table.lo, table.step_shift))
            .collect();
        Ok(CpuInt::new(x.shape().to_vec(), out))
    }

    fn rope_int(&self, x: &CpuInt, table: &RopeTable<CpuInt>, pos_offset: usize) -> Result<CpuInt> {
        let (_, cols) = check_rope_int(x.shape(), table, pos_offset)?;
        let hd = table.head_dim;
        let t = table.table.data();
        let mut out = x.data().to_vec();
        for (r, row) in out.chunks_exact_mut(cols).enumerate() {
            let trow = &t[(pos_offset + r) * hd..(pos_offset + r + 1) * hd];
            for head in row.chunks_exact_mut(hd) {
                for (pair, cs) in head.chunks_exact_mut(2).zip(trow.chunks_exact(2)) {
                    let (a, b) = (pair[0], pair[1]);
                    let (c, s) = (cs[0], cs[1]);
                    pair[0] = mul_shift(a, c, 30).wrapping_sub(mul_shift(b, s, 30));
                    pair[1] = mul_shift(a, s, 30).wrapping_add(mul_shift(b, c, 30));
                }
            }
        }
        Ok(CpuInt::new(x.shape().to_vec(), out))
    }

    fn attention_int(
        &self,
        q: &QActs<CpuInt>,
        k: &QActs<CpuInt>,
        v: &QActs<CpuInt>,
        kv_lens: &[u32],
        p: &AttentionParams,
        scale: ScoreScale,
    ) -> Result<CpuInt> {
        check_attention_int(q, k, v, kv_lens, p)?;
        let hd = p.head_dim;
        let (qd, qs) = q.buf.data().split_at(q.scales_offset());
        let (kd, ks) = k.buf.data().split_at(k.scales_offset());
        let (vd, vs) = v.buf.data().split_at(v.scales_offset());
        let (qd, kd, vd) = (bytes(qd), bytes(kd), bytes(vd));
        let group_ratio = p.heads / p.kv_heads;
        let mut out = vec![0i32; q.rows * q.cols];
        let mut scores = Vec::with_capacity(p.kv_rows);
        let mut acc = vec![0i32; hd];
        for (b, &kv_len) in kv_lens.iter().enumerate() {
            for i in 0..p.q_len {
                let qrow = b * p.q_len + i;
                let visible = if p.causal {
                    (p.pos_offset + i + 1).min(kv_len as usize)
                } else {
                    kv_len as usize
                };
                for h in 0..p.heads {
                    let kvh = h / group_ratio;
                    let qg = qrow * p.heads + h;
                    let qvec = &qd[qg * hd..(qg + 1) * hd];
                    let qscale = scale_at(qs, qg);
                    scores.clear();
                    for j in 0..visible {
                        let kg = (b * p.kv_rows + j) * p.kv_heads + kvh;
                        let dot = dot_i8(qvec, &kd[kg * hd..(kg + 1) * hd]);
                        scores.push(score(dot, qscale, scale_at(ks, kg), scale));
                    }
                    let max = scores.iter().copied().max().unwrap_or(0);
                    let mut sum = 0u32;
                    for s in scores.iter_mut() {
                        let e = exp2_neg_q15((max as u32).wrapping_sub(*s as u32));
                        sum += e;
                        *s = e as i32;
                    }
                    acc.fill(0);
                    for (j, &e) in scores.iter().enumerate() {
                        let prob = ((e as u32) << 16).wrapping_add(sum / 2) / sum;
                        let vg = (b * p.kv_rows + j) * p.kv_heads + kvh;
                        let w = value_weight(prob, scale_at(vs, vg));
                        for (a, &vq) in acc.iter_mut().zip(&vd[vg * hd..(vg + 1) * hd]) {
                            *a = a.wrapping_add(i32::from(vq).wrapping_mul(w));
                        }
                    }
                    let dst = &mut out[qrow * q.cols + h * hd..qrow * q.cols + (h + 1) * hd];
                    for (o, &a) in dst.iter_mut().zip(&acc) {
                        *o = mul_shift(a, 1, 8);
                    }
                }
            }
        }
        Ok(CpuInt::new(vec![q.rows, q.cols], out))
    }

    fn write_rows_int(&self, dst: &mut CpuInt, row: usize, src: &CpuInt) -> Result<()> {
        dst.write_rows(row, src)
    }

    fn slice_rows_int(&self, x: &CpuInt, start: usize, count: usize) -> Result<CpuInt> {
        x.slice_rows(start, count)
    }

    fn mean_pool_int(&self, x: &CpuInt, seq: usize, lens: &[u32]) -> Result<CpuInt> {
        let (batch, dim) = check_pool(x.shape(), seq, lens)?;
        let mut out = vec![0i32; batch * dim];
        for (b, acc) in out.chunks_exact_mut(dim).enumerate() {
            let len = lens[b] as usize;
            for row in x.data()[b * seq * dim..].chunks_exact(dim).take(len) {
                acc.iter_mut()
                    .zip(row)
                    .for_each(|(a, v)| *a = a.wrapping_add(*v));
            }
            acc.iter_mut().for_each(|a| *a = div_round(*a, len as u32));
        }
        Ok(CpuInt::new(vec![batch, dim], out))
    }
}

/// One row of LayerNorm (`beta` given) or RMSNorm: see the module docs for the error bound.
///
/// 1. `xc = x - round(mean)` (LayerNorm only).
/// 2. `xs = xc · 2^-s` with `s` chosen so that `max |xs| ∈ [2^14, 2^15)`.
/// 3. `var8 = Σ (xs² >> 8) / cols`, normalised by an even shift `2t` into `[2^28, 2^30)`;
///    `r = isqrt(var8 · 4^t)`, so `std(xc) = r · 2^(4 - t + s)`.
/// 4. `y = round(xc · 2^30 / r) · 2^(t - s - 18)` (Q16), `· gamma` (Q16) to Fx, `+ beta`.
pub(crate) fn norm_row(x: &[i32], gamma: &[i32], beta: Option<&[i32]>, frac: u32, out: &mut [i32]) {
    let cols = x.len() as u32;
    let mean = if beta.is_some() {
        let sum = x.iter().fold(0i32, |a, v| a.wrapping_add(*v));
        div_round(sum, cols)
    } else {
        0
    };
    let amax = x
        .iter()
        .map(|v| v.wrapping_sub(mean).unsigned_abs())
        .max()
        .unwrap_or(0);
    if amax == 0 {
        for (i, o) in out.iter_mut().enumerate() {
            *o = beta.map_or(0, |b| b[i]);
        }
        return;
    }
    let s = bit_len(amax) as i32 - 15;
    let mut sq = 0u32;
    for v in x {
        let xc = v.wrapping_sub(mean);
        let xs = if s >= 0 { xc >> s } else { xc << -s };
        let m = xs.unsigned_abs();
        sq = sq.wrapping_add((m * m) >> 8);
    }
    let var8 = sq / cols;
    let mut t = 0i32;
    let mut v = var8.max(1);
    while v < (1 << 28) {
        v <<= 2;
        t += 1;
    }
    let r = isqrt(v);
    let inv = ((1u32 << 30) / r) as i32;
    for (i, (o, v)) in out.iter_mut().zip(x).enumerate() {
        let xc = v.wrapping_sub(mean);
        let nrm = mul_shift(xc, inv, 18 - t + s);
        let y = mul_shift(nrm, gamma[i], 2 * NORM_FRAC as i32 - frac as i32);
        *o = y.wrapping_add(beta.map_or(0, |b| b[i]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_range_requantisation_equals_the_general_one() {
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for i in 0..200_000 {
            let acc = (next() as i32) >> (next() % 32);
            let reduced = (next() % (1 << 15)) as i32;
            let shift = (next() % 18) as i32;
            let mult = (next() % (1 << 31)) as i32;
            let exp = 16 + 17 + (next() % 45) as i32;
            let (acc, reduced) = match i {
                0 => (i32::MIN, (1 << 15) - 1),
                1 => (i32::MAX, (1 << 15) - 1),
                _ => (acc, reduced),
            };
            let scale = GroupScale { reduced, shift };
            assert_eq!(
                requantize_in_range(acc, reduced as u32, shift, mult as u32, exp),
                requantize(acc, scale, mult, exp),
                "acc {acc} reduced {reduced} shift {shift} mult {mult} exp {exp}"
            );
        }
    }
}
