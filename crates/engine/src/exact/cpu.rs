//! Exact ops on the CPU: the reference implementation of the integer specification in
//! [`super`]. Integer arithmetic is exact, so SIMD (AVX2/AVX-512 here, simd128 in wasm) may
//! reorder sums freely without changing a bit.

use super::{
    ActTable, EXP2_NEG_Q30, ExactBackend, GroupScale, NORM_FRAC, QActs, QMatrix, QNorm, RopeTable,
    SCORE_FRAC, ScoreScale, WeightLayout, bit_len, check_act_table, check_attention_int,
    check_norm, check_qlinear, check_qmatrix, check_quantize, check_rope_int, div_round, isqrt,
    kernels, mul_shift,
    pack::{self, PackedShape},
    quantize_group, score, table_lookup, value_scale, value_weight,
};
use crate::{
    AttentionParams, Result, Shaped, check_pool, check_same,
    cpu::{CpuBackend, CpuTensor, vectorized},
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

/// `Σ a[i] · b[i]` over int8 slices. Callers run inside [`vectorized`], where the generic
/// loop becomes vector code; the relaxed-SIMD wasm build has its own.
#[inline(always)]
fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
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

/// The scales of one sequence's key and value rows for one KV head.
struct Keys {
    k: Vec<GroupScale>,
    v: Vec<GroupScale>,
    /// `value_scale` of each value row.
    v_scale: Vec<i32>,
    /// Every key shift and value scale is in the range of the branch-free forms.
    k_shift: (i32, i32),
    fast_values: bool,
}

impl Keys {
    #[inline(always)]
    fn gather(
        ks: &[i32],
        vs: &[i32],
        first: usize,
        len: usize,
        kv_heads: usize,
        kvh: usize,
    ) -> Keys {
        let at = |j: usize| (first + j) * kv_heads + kvh;
        let k: Vec<GroupScale> = (0..len).map(|j| scale_at(ks, at(j))).collect();
        let v: Vec<GroupScale> = (0..len).map(|j| scale_at(vs, at(j))).collect();
        let v_scale = v.iter().map(|s| value_scale(s.reduced)).collect();
        let k_shift = k.iter().fold((i32::MAX, i32::MIN), |(lo, hi), s| {
            (lo.min(s.shift), hi.max(s.shift))
        });
        let fast_values = v
            .iter()
            .all(|s| (0..1 << 15).contains(&s.reduced) && (0..=14).contains(&s.shift));
        Keys {
            fast_values: fast_values && k.iter().all(|s| (0..1 << 15).contains(&s.reduced)),
            k,
            v,
            v_scale,
            k_shift,
        }
    }
}

/// Per-query buffers of the attention loop.
#[derive(Default)]
struct HeadScratch {
    dots: Vec<i32>,
    /// Scores, then softmax numerators.
    e: Vec<u32>,
    /// Each value row's weight ([`value_weight`]).
    w: Vec<i32>,
}

impl HeadScratch {
    /// The value weights of the `visible` keys from `first` on, from `self.dots` (one per
    /// such key): scores, softmax (base 2, integer) and [`value_weight`], in branch-free loops
    /// over the keys when every scale is in range (checked once per head), else with the
    /// specification's functions.
    #[inline(always)]
    fn weights(
        &mut self,
        keys: &Keys,
        q: GroupScale,
        scale: ScoreScale,
        first: usize,
        visible: usize,
    ) {
        let dots = &self.dots[..visible];
        let (k_scales, v_scales, v_values) =
            (&keys.k[first..], &keys.v[first..], &keys.v_scale[first..]);
        // Score shifts `E - 30 - q.shift - k.shift` in 1..=62, non-negative factors.
        let fast = keys.fast_values
            && (0..1 << 15).contains(&q.reduced)
            && scale.mult >= 0
            && visible > 0
            && i64::from(scale.exp) - 30 - i64::from(q.shift) - i64::from(keys.k_shift.1) >= 1
            && i64::from(scale.exp) - 30 - i64::from(q.shift) - i64::from(keys.k_shift.0) <= 62;
        self.e.resize(visible, 0);
        if fast {
            let base = scale.exp - 30 - q.shift;
            for ((e, &acc), k) in self.e.iter_mut().zip(dots).zip(k_scales) {
                let both = (q.reduced * k.reduced) as u64; // < 2^30
                let combined = ((both * scale.mult as u64 + (1 << 29)) >> 30).min(i32::MAX as u64);
                let s = (base - k.shift) as u32; // 1..=62
                let m = ((u64::from(acc.unsigned_abs()) * combined + (1u64 << (s - 1))) >> s)
                    .min(i32::MAX as u64) as i32;
                *e = (if acc < 0 { -m } else { m }) as u32;
            }
        } else {
            for ((e, &acc), &k) in self.e.iter_mut().zip(dots).zip(k_scales) {
                *e = score(acc, q, k, scale) as u32;
            }
        }
        let mut max = i32::MIN;
        for &s in &self.e {
            max = max.max(s as i32);
        }
        let max = if visible == 0 { 0 } else { max as u32 };
        let mut sum = 0u32;
        for e in self.e.iter_mut() {
            *e = exp2_neg_q15_unbranched(max.wrapping_sub(*e));
            sum = sum.wrapping_add(*e);
        }
        if sum == 0 {
            self.w.clear();
            return; // no visible key
        }
        self.w.resize(visible, 0);
        let divide = DivideBy::new(sum);
        let half = sum / 2;
        if fast {
            for ((w, &e), (v, &vscale)) in self
                .w
                .iter_mut()
                .zip(&self.e)
                .zip(v_scales.iter().zip(v_values))
            {
                let prob = divide.floor((e << 16).wrapping_add(half));
                let t = (15 - v.shift) as u32; // 1..=15
                // prob <= 2^16 and vscale < 2^16: the product fits 33 bits.
                *w = ((u64::from(prob) * vscale as u64 + (1u64 << (t - 1))) >> t)
                    .min(i32::MAX as u64) as i32;
            }
        } else {
            for ((w, &e), &v) in self.w.iter_mut().zip(&self.e).zip(v_scales) {
                *w = value_weight(divide.floor((e << 16).wrapping_add(half)), v);
            }
        }
    }
}

/// `acc[d] += Σ_j row(j)[d] · w[j]`, wrapping, four rows at a time (the sums wrap, so any
/// order gives the same bits, and `acc` is loaded and stored a quarter as often).
#[inline(always)]
fn accumulate_values<'a>(acc: &mut [i32], w: &[i32], row: impl Fn(usize) -> &'a [i8]) {
    let mut j = 0;
    while j + 4 <= w.len() {
        let (v0, v1, v2, v3) = (row(j), row(j + 1), row(j + 2), row(j + 3));
        let (w0, w1, w2, w3) = (w[j], w[j + 1], w[j + 2], w[j + 3]);
        for (d, a) in acc.iter_mut().enumerate() {
            let t = i32::from(v0[d])
                .wrapping_mul(w0)
                .wrapping_add(i32::from(v1[d]).wrapping_mul(w1))
                .wrapping_add(i32::from(v2[d]).wrapping_mul(w2))
                .wrapping_add(i32::from(v3[d]).wrapping_mul(w3));
            *a = a.wrapping_add(t);
        }
        j += 4;
    }
    for (j, &wj) in w.iter().enumerate().skip(j) {
        for (a, &v) in acc.iter_mut().zip(row(j)) {
            *a = a.wrapping_add(i32::from(v).wrapping_mul(wj));
        }
    }
}

/// [`exp2_neg_q15`] without branches (the table read and both shifts happen for every `d`,
/// the result is chosen at the end), so that a loop over keys vectorises. Equal for every `d`
/// (tested).
#[inline(always)]
fn exp2_neg_q15_unbranched(d: u32) -> u32 {
    let int = d >> SCORE_FRAC;
    let frac = d & ((1 << SCORE_FRAC) - 1);
    let idx = (frac >> 8) as usize;
    let low = u64::from(frac & 0xFF);
    let hi = EXP2_NEG_Q30[idx] as u64;
    let step = hi - EXP2_NEG_Q30[idx + 1] as u64; // the table decreases; < 2^30
    let v = hi - ((step * low + 128) >> 8);
    let shift = 15 + int.min(15);
    let r = ((v + (1u64 << (shift - 1))) >> shift) as u32;
    if int >= 16 { 0 } else { r }
}

/// `floor(n / d)` for every `u32` `n` and one `d > 0`, by a multiply (Granlund and
/// Montgomery, 1994): with `2^(l-1) < d <= 2^l`, `s = 32 + l` and `magic = ceil(2^s / d)`,
/// `magic · d - 2^s < d <= 2^(s - 32)`, so `(n · magic) >> s` is exact for every `n < 2^32`.
#[derive(Clone, Copy, Debug)]
struct DivideBy {
    magic: u64,
    shift: u32,
}

impl DivideBy {
    fn new(d: u32) -> DivideBy {
        assert!(d > 0, "division by zero");
        let shift = 32 + bit_len(d - 1);
        DivideBy {
            magic: (1u128 << shift).div_ceil(u128::from(d)) as u64,
            shift,
        }
    }

    /// `(n · magic) >> shift` in 64-bit pieces (so that a loop of them vectorises): with
    /// `magic = hi · 2^32 + lo`, `n · magic = n · hi · 2^32 + n · lo`, and adding the fraction
    /// `(n · lo mod 2^32) / 2^32 < 1` to an integer before a floor division by a power of two
    /// changes nothing.
    #[inline(always)]
    fn floor(self, n: u32) -> u32 {
        let (hi, lo) = (self.magic >> 32, self.magic & 0xFFFF_FFFF); // hi <= 2
        let top = u64::from(n) * hi + ((u64::from(n) * lo) >> 32); // < 2^35
        (top >> (self.shift - 32)) as u32
    }
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

impl ExactBackend for CpuBackend {
    type Int = CpuInt;

    fn upload_int(&self, data: &[i32], shape: &[usize]) -> Result<CpuInt> {
        self.upload_int_vec(data.to_vec(), shape)
    }

    fn upload_int_vec(&self, data: Vec<i32>, shape: &[usize]) -> Result<CpuInt> {
        if shape.iter().product::<usize>() != data.len() {
            return Err(shape_err(
                "upload_int",
                format!("{} values for shape {shape:?}", data.len()),
            ));
        }
        Ok(CpuInt::new(shape.to_vec(), data))
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
        vectorized(
            #[inline(always)]
            || {
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
            },
        );
        let len = buf.len();
        Ok(QActs {
            rows,
            cols,
            group,
            buf: CpuInt::new(vec![len], buf),
        })
    }

    fn prepare_qmatrix(&self, w: QMatrix<CpuInt>) -> Result<QMatrix<CpuInt>> {
        check_qmatrix("prepare_qmatrix", &w)?;
        if w.layout == WeightLayout::Packed {
            return Ok(w);
        }
        let shape = PackedShape {
            rows: w.rows,
            cols: w.cols,
            group: w.group,
        };
        let data = pack::pack_data(w.data.data(), shape);
        let requant = pack::pack_requant(w.requant.data(), shape);
        Ok(QMatrix {
            data: CpuInt::new(vec![data.len()], data),
            requant: CpuInt::new(vec![requant.len()], requant),
            layout: WeightLayout::Packed,
            ..w
        })
    }

    fn with_requant(&self, w: &QMatrix<CpuInt>, requant: CpuInt) -> Result<QMatrix<CpuInt>> {
        let Some(shape) = w.packed_shape() else {
            let raw = QMatrix {
                requant,
                ..w.clone()
            };
            check_qmatrix("with_requant", &raw)?;
            return Ok(raw);
        };
        if requant.numel() != shape.rows * shape.w_blocks() * 2 {
            return Err(shape_err(
                "with_requant",
                format!(
                    "{} scales for a [{}, {}] matrix",
                    requant.numel() / 2,
                    w.rows,
                    w.cols
                ),
            ));
        }
        let packed = pack::pack_requant(requant.data(), shape);
        Ok(QMatrix {
            requant: CpuInt::new(vec![packed.len()], packed),
            ..w.clone()
        })
    }

    fn qlinear(&self, x: &QActs<CpuInt>, w: &QMatrix<CpuInt>) -> Result<CpuInt> {
        check_qlinear(x, w)?;
        let prepared;
        let w = match w.layout {
            WeightLayout::Packed => w,
            WeightLayout::Rows => {
                prepared = self.prepare_qmatrix(w.clone())?;
                &prepared
            }
        };
        let (xdata, x_scales) = x.buf.data().split_at(x.scales_offset());
        let job = kernels::Job {
            x: xdata,
            x_scales,
            w: bytemuck::cast_slice(w.data.data()),
            requant: w.requant.data(),
            bias: w.bias.as_ref().map(|b| b.data()),
            shape: PackedShape {
                rows: w.rows,
                cols: w.cols,
                group: w.group,
            },
            m: x.rows,
            group: x.group,
        };
        let mut out = vec![0i32; x.rows * w.rows];
        kernels::qlinear(&job, &mut out);
        Ok(CpuInt::new(vec![x.rows, w.rows], out))
    }

    fn qembedding(&self, table: &QMatrix<CpuInt>, ids: &[u32]) -> Result<CpuInt> {
        check_qmatrix("qembedding", table)?;
        let dim = table.cols;
        let blocks = dim / table.group;
        let data = table.data.data();
        let requant = table.requant.data();
        let packed = table.packed_shape();
        let mut row = vec![0i8; dim];
        let mut out = Vec::with_capacity(ids.len() * dim);
        for &id in ids {
            let id = id as usize;
            if id >= table.rows {
                return Err(shape_err(
                    "qembedding",
                    format!("token id {id} outside vocabulary of {}", table.rows),
                ));
            }
            match packed {
                Some(shape) => pack::unpack_row(data, shape, id, &mut row),
                None => row.copy_from_slice(&bytes(data)[id * dim..(id + 1) * dim]),
            }
            out.extend(row.iter().enumerate().map(|(col, &q)| {
                let (mult, exp) = match packed {
                    Some(shape) => pack::requant_of(requant, shape, id, col / table.group),
                    None => {
                        let at = 2 * (id * blocks + col / table.group);
                        (requant[at], requant[at + 1])
                    }
                };
                mul_shift(i32::from(q), mult, exp)
            }));
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
        vectorized(
            #[inline(always)]
            || {
                let mut scratch = HeadScratch::default();
                let mut acc = vec![0i32; hd];
                for (b, &kv_len) in kv_lens.iter().enumerate() {
                    for kvh in 0..p.kv_heads {
                        // Per key and value row of this sequence and KV head, once.
                        let keys =
                            Keys::gather(ks, vs, b * p.kv_rows, kv_len as usize, p.kv_heads, kvh);
                        for i in 0..p.q_len {
                            let qrow = b * p.q_len + i;
                            let end = if p.causal {
                                (p.pos_offset + i + 1).min(kv_len as usize)
                            } else {
                                kv_len as usize
                            };
                            // A sliding window skips the keys before it.
                            let first = p.first_visible(p.pos_offset + i).min(end);
                            let visible = end - first;
                            for h in kvh * group_ratio..(kvh + 1) * group_ratio {
                                let qg = qrow * p.heads + h;
                                let qvec = &qd[qg * hd..(qg + 1) * hd];
                                let key_row =
                                    |j: usize| (b * p.kv_rows + first + j) * p.kv_heads + kvh;
                                scratch.dots.resize(visible, 0);
                                for (j, d) in scratch.dots.iter_mut().enumerate() {
                                    let kg = key_row(j);
                                    *d = dot_i8(qvec, &kd[kg * hd..(kg + 1) * hd]);
                                }
                                scratch.weights(&keys, scale_at(qs, qg), scale, first, visible);
                                acc.fill(0);
                                accumulate_values(&mut acc, &scratch.w, |j| {
                                    let vg = key_row(j);
                                    &vd[vg * hd..(vg + 1) * hd]
                                });
                                let dst =
                                    &mut out[qrow * q.cols + h * hd..qrow * q.cols + (h + 1) * hd];
                                for (o, &a) in dst.iter_mut().zip(&acc) {
                                    *o = mul_shift(a, 1, 8);
                                }
                            }
                        }
                    }
                }
            },
        );
        Ok(CpuInt::new(vec![q.rows, q.cols], out))
    }

    fn write_rows_int(&self, dst: &mut CpuInt, row: usize, src: &CpuInt) -> Result<()> {
        dst.write_rows(row, src)
    }

    fn slice_rows_int(&self, x: &CpuInt, start: usize, count: usize) -> Result<CpuInt> {
        x.slice_rows(start, count)
    }

    fn reshape_int(&self, x: &CpuInt, shape: &[usize]) -> Result<CpuInt> {
        x.reshaped(shape)
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
    use crate::exact::exp2_neg_q15;

    #[test]
    fn the_unbranched_exp2_equals_the_specification() {
        for d in (0..1u32 << 21).chain([u32::MAX, u32::MAX - 1, 1 << 31, (16 << 16) - 1]) {
            assert_eq!(exp2_neg_q15_unbranched(d), exp2_neg_q15(d), "d = {d}");
        }
    }

    #[test]
    fn division_by_multiply_is_exact() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u32
        };
        let mut divisors = vec![
            1,
            2,
            3,
            7,
            32768,
            32769,
            65535,
            u32::MAX,
            u32::MAX - 1,
            1 << 31,
        ];
        divisors.extend((0..200).map(|_| next() >> (next() % 32)).filter(|&d| d > 0));
        for d in divisors {
            let div = DivideBy::new(d);
            let mut ns = vec![0, 1, d - 1, d, u32::MAX, u32::MAX - 1];
            ns.extend(d.checked_mul(3).map(|x| x - 1));
            ns.extend((0..2000).map(|_| next()));
            for n in ns {
                assert_eq!(div.floor(n), n / d, "{n} / {d}");
            }
        }
    }
}
