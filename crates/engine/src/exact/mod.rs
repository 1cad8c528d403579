//! Exact precision: integer-only transformer ops whose results are the same bits on every
//! backend (the CPU backend, wgpu on any GPU, WebGPU in a browser, wasm).
//!
//! Floating point gives different bits on different devices (summation order, FMA contraction,
//! transcendental functions), so redundant volunteers could only be compared with tolerances.
//! Here every op is specified in integers, with one rounding rule, so two honest executions
//! produce identical bytes and a result can be checked by its hash.
//!
//! # Number formats
//!
//! - **Fx** (fixed point): an `i32` holding `value · 2^F`. `F` (the *frac bits*) is chosen per
//!   model by the quantiser (16 for MiniLM, 12 for SmolLM2, whose residual stream reaches
//!   ±25 000). The residual stream and every op output is Fx.
//! - **Q8** (quantised activations, [`QActs`]): before a matrix product, each *group* (a row, or
//!   one head's slice of a row) is quantised to int8 with its own scale, see [`quantize_group`].
//! - **Q8 weights** ([`QMatrix`]): int8 per output channel, with a scale `M · 2^-E`
//!   (`M ∈ [2^30, 2^31)`) stored as two integers, so requantisation is integer-only.
//! - Tables (GELU/SiLU, RoPE cos/sin) are integers computed once by the quantiser and stored
//!   in the content-addressed model file; the `exp2` table is a constant of this module
//!   ([`EXP2_NEG_Q30`]).
//!
//! # Rounding
//!
//! One rule everywhere: round half away from zero, via [`mul_shift`] (`a·b / 2^s` with a
//! 64-bit intermediate) and [`div_round`]. Sums are `i32` with wrapping overflow: overflow
//! would cost accuracy, never determinism. WGSL has no 64-bit integers, so its `mul_shift`
//! builds the product from 16-bit limbs; `tests/exact_bits.rs` checks it against this code.
//!
//! # Error bounds (relative to the real-valued op on the same inputs)
//!
//! - Q8 quantisation: at most half a step, `amax / 254` per element (as any symmetric int8).
//! - Requantisation multipliers: 30 significant bits, below the Fx resolution.
//! - Norms: the variance is summed from squares truncated by 8 bits of a row scaled to
//!   `[2^14, 2^15)`, so the standard deviation is within `2^-10` relative in the worst case (one
//!   outlier dominating a 1024-wide row) and about `2^-17` typically.
//! - GELU / SiLU: linear interpolation in a table with steps of 1/64 (GELU, on [-8, 8)) and 1/32
//!   (SiLU, on [-16, 16)): at most `h²/8 · max|f''|` ≈ 2.4e-5 and 6e-5, plus half an Fx unit;
//!   beyond the table GELU/SiLU(x) is taken as `x` (above) or 0 (below), within 1e-14 / 2e-6.
//! - Softmax: scores in base-2 fixed point with 16 fractional bits; `2^-f` from a 257-entry
//!   Q30 table with linear interpolation (relative error < 2^-17); weights in Q15 and
//!   probabilities in Q16, so a probability is within 2^-16 absolute.
//! - RoPE: cos/sin in Q30, each product rounded once: within one Fx unit.

mod exp2_table;

pub mod cpu;
pub mod gpu;
pub mod kernels;
pub mod pack;
pub mod selfcheck;

pub use exp2_table::EXP2_NEG_Q30;

use std::future::Future;

use crate::{AttentionParams, Result, Shaped, shape_err};

/// The largest int8 magnitude used: quantisation is symmetric, `-127..=127`.
pub const Q_MAX: i32 = 127;
/// Fractional bits of base-2 softmax scores.
pub const SCORE_FRAC: u32 = 16;
/// Fractional bits of norm scales (`gamma`) and normalised values.
pub const NORM_FRAC: u32 = 16;
/// The widest row a norm accepts: the variance sum is a `u32` of squares below `2^22`.
pub const MAX_NORM_COLS: usize = 1024;

/// `round(a · b / 2^s)`, half away from zero, saturated to `±(2^31 - 1)`. A negative `s`
/// shifts left. The product is exact (64-bit): this is the only multiply that can overflow
/// 32 bits in the exact ops.
pub fn mul_shift(a: i32, b: i32, s: i32) -> i32 {
    let negative = (a < 0) != (b < 0);
    let product = u64::from(a.unsigned_abs()) * u64::from(b.unsigned_abs()); // < 2^62 + 1
    let magnitude = if s > 0 {
        if s >= 63 {
            0
        } else {
            (product + (1u64 << (s - 1))) >> s
        }
    } else {
        let left = s.unsigned_abs();
        if product == 0 {
            0
        } else if left >= 32 || product > (i32::MAX as u64 >> left) {
            i32::MAX as u64
        } else {
            product << left
        }
    };
    let magnitude = magnitude.min(i32::MAX as u64) as i32;
    if negative { -magnitude } else { magnitude }
}

/// `round(a / b)` for `b > 0`, half away from zero.
pub fn div_round(a: i32, b: u32) -> i32 {
    debug_assert!(b > 0);
    let magnitude = (u64::from(a.unsigned_abs()) + u64::from(b / 2)) / u64::from(b);
    let magnitude = magnitude.min(i32::MAX as u64) as i32;
    if a < 0 { -magnitude } else { magnitude }
}

/// Floor of the square root, bit by bit (the same loop runs in WGSL).
pub fn isqrt(n: u32) -> u32 {
    let mut rest = n;
    let mut root = 0u32;
    let mut bit = 1u32 << 30;
    while bit > n {
        bit >>= 2;
    }
    while bit != 0 {
        if rest >= root + bit {
            rest -= root + bit;
            root = (root >> 1) + bit;
        } else {
            root >>= 1;
        }
        bit >>= 2;
    }
    root
}

/// Number of significant bits of `x` (0 for 0).
pub fn bit_len(x: u32) -> u32 {
    32 - x.leading_zeros()
}

/// The scale of one quantised group: the group's largest magnitude reduced to 15 bits,
/// `amax = reduced · 2^shift`. A value `q` stands for `q · reduced · 2^shift / 127` Fx units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupScale {
    pub reduced: i32,
    pub shift: i32,
}

/// Quantises one group of Fx values to int8: `q = round(|x >> shift| · 127 / reduced)` with
/// the sign of `x`, where `reduced = amax >> shift < 2^15`.
#[inline(always)]
pub fn quantize_group(x: &[i32], out: &mut [i8]) -> GroupScale {
    let amax = x.iter().map(|v| v.unsigned_abs()).max().unwrap_or(0);
    let shift = bit_len(amax).saturating_sub(15);
    let reduced = amax >> shift;
    if reduced == 0 {
        out.fill(0);
    } else {
        // floor(n / d) for n = 254·m + reduced < 2^23 (m <= reduced < 2^15) and
        // d = 2·reduced <= 2^16, as a multiply (Granlund and Montgomery, 1994): with
        // 2^(l-1) < d <= 2^l, s = 23 + l and magic = ceil(2^s / d) < 2^24 + 1,
        // magic·d - 2^s < d <= 2^(s - 23), so (n · magic) >> s is exact for every n < 2^23.
        // A 32 × 32-bit product per value, which vectorises. Checked against the division in
        // the tests.
        let (magic, s) = quantize_magic(reduced);
        for (q, &v) in out.iter_mut().zip(x) {
            let n = (v.unsigned_abs() >> shift) * 2 * Q_MAX as u32 + reduced;
            let r = ((u64::from(n) * u64::from(magic)) >> s) as i32;
            let sign = v >> 31; // 0 or -1
            *q = ((r ^ sign) - sign) as i8;
        }
    }
    GroupScale {
        reduced: reduced as i32,
        shift: shift as i32,
    }
}

/// `(magic, s)` of [`quantize_group`] for `reduced` in `1..2^15`, from a table computed once
/// (a 64-bit division per group would cost more than the group's multiplies).
fn quantize_magic(reduced: u32) -> (u32, u32) {
    static TABLE: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        (0..1u32 << 15)
            .map(|r| {
                let d = 2 * r.max(1);
                (1u64 << (23 + bit_len(d - 1))).div_ceil(u64::from(d)) as u32
            })
            .collect()
    });
    (table[reduced as usize], 23 + bit_len(2 * reduced - 1))
}

/// Requantises an int8·int8 sum to Fx: `acc · scale_x · scale_w` where the activation group
/// has `x` and the weight channel has `M · 2^-E` (which already includes the 1/127 of the
/// activation step and any Fx change).
pub fn requantize(acc: i32, x: GroupScale, mult: i32, exp: i32) -> i32 {
    let combined = mul_shift(x.reduced, mult, 15);
    mul_shift(acc, combined, exp - 15 - x.shift)
}

/// `2^(-d / 2^SCORE_FRAC)` in Q15 for `d >= 0` (a softmax weight; 1.0 = 32768).
pub fn exp2_neg_q15(d: u32) -> u32 {
    let int = d >> SCORE_FRAC;
    if int >= 16 {
        return 0;
    }
    let frac = d & ((1 << SCORE_FRAC) - 1);
    let idx = (frac >> 8) as usize;
    let low = (frac & 0xFF) as i32;
    let hi = EXP2_NEG_Q30[idx];
    let step = hi - EXP2_NEG_Q30[idx + 1];
    let v = hi - mul_shift(step, low, 8);
    mul_shift(v, 1, 15 + int as i32) as u32
}

/// Linear interpolation in an activation table (see [`ActTable`]).
pub fn table_lookup(x: i32, table: &[i32], lo: i32, step_shift: u32) -> i32 {
    let len = (table.len() - 1) as i64;
    let u = i64::from(x) - i64::from(lo);
    if u < 0 {
        return 0;
    }
    let idx = u >> step_shift;
    if idx >= len {
        return x;
    }
    let idx = idx as usize;
    let frac = (u & ((1 << step_shift) - 1)) as i32;
    let base = table[idx];
    base.wrapping_add(mul_shift(
        table[idx + 1].wrapping_sub(base),
        frac,
        step_shift as i32,
    ))
}

/// Quantised activations: int8 values packed four to a word, then one [`GroupScale`] (two
/// words) per group, all in one buffer so that a kernel binds it once.
#[derive(Clone, Debug)]
pub struct QActs<T> {
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
    pub buf: T,
}

impl<T> QActs<T> {
    pub fn groups_per_row(&self) -> usize {
        self.cols / self.group
    }
    /// Word offset of the scales.
    pub fn scales_offset(&self) -> usize {
        self.rows * self.cols / 4
    }
}

/// An int8 matrix with one scale per row and block of `group` columns (`group == cols`: one
/// scale per row): a linear layer's weight (rows = output channels) or an embedding table
/// (rows = tokens).
#[derive(Clone, Debug)]
pub struct QMatrix<T> {
    pub rows: usize,
    pub cols: usize,
    /// `[rows, cols / 4]` words, four int8 each, the first in the lowest byte.
    pub data: T,
    /// Columns per scale.
    pub group: usize,
    /// `[rows, cols / group, 2]`: `(M, E)`, each block's scale `M · 2^-E`.
    pub requant: T,
    /// `[rows]` Fx, added after requantisation.
    pub bias: Option<T>,
    /// How `data` and `requant` are arranged: as in the model file, or packed by
    /// [`ExactBackend::prepare_qmatrix`] for a backend's kernels.
    pub layout: WeightLayout,
}

/// The arrangement of a [`QMatrix`]'s words. The values are the same in both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightLayout {
    /// As in the model file: `data` `[rows, cols / 4]`, `requant` `[rows, cols / group, 2]`.
    #[default]
    Rows,
    /// Packed for the CPU kernels, see [`pack`].
    Packed,
}

/// A norm's parameters: `gamma` in Q16 and, for LayerNorm, `beta` in Fx. RMSNorm has no beta.
#[derive(Clone, Debug)]
pub struct QNorm<T> {
    pub gamma: T,
    pub beta: Option<T>,
}

/// An activation as a table: entry `i` is `f(lo + i · 2^step_shift)` in Fx. Inputs past the
/// last entry give `x`, inputs below `lo` give 0 (true of GELU and SiLU far enough out).
#[derive(Clone, Debug)]
pub struct ActTable<T> {
    pub table: T,
    pub len: usize,
    pub lo: i32,
    pub step_shift: u32,
}

/// Rotary embedding table: `[positions, head_dim / 2, 2]` of (cos, sin) in Q30.
#[derive(Clone, Debug)]
pub struct RopeTable<T> {
    pub table: T,
    pub positions: usize,
    pub head_dim: usize,
}

/// The constant that turns a Q8·Q8 score sum into base-2 Fx (`SCORE_FRAC` bits):
/// `log2(e) / (sqrt(head_dim) · 127² · 2^(2F)) · 2^SCORE_FRAC = M · 2^-E`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScoreScale {
    pub mult: i32,
    pub exp: i32,
}

/// One attention score in base-2 Fx from the Q8 dot product of a query and key group.
pub fn score(acc: i32, q: GroupScale, k: GroupScale, scale: ScoreScale) -> i32 {
    let both = q.reduced * k.reduced; // < 2^30
    let combined = mul_shift(both, scale.mult, 30);
    mul_shift(acc, combined, scale.exp - 30 - q.shift - k.shift)
}

/// The weight of a value row in the attention output: `p` (Q16) times the row's scale,
/// in Fx units with 8 extra fractional bits.
pub fn value_weight(p: u32, v: GroupScale) -> i32 {
    mul_shift(p as i32, value_scale(v.reduced), 15 - v.shift)
}

/// `reduced · 2^7 / 127`, rounded: the first factor of [`value_weight`], one per value row.
pub fn value_scale(reduced: i32) -> i32 {
    // round(2^37 / 127): the 1/127 of the value quantisation step, in Q37.
    const INV127_Q37: i32 = 1_082_196_484;
    mul_shift(reduced, INV127_Q37, 30)
}

/// Splits a positive real scale into `(M, E)` with `M ∈ [2^30, 2^31)` and `scale ≈ M · 2^-E`.
/// Used by the quantiser only (loading time, not the forward pass).
pub fn split_scale(scale: f64) -> Result<(i32, i32)> {
    if !(scale.is_finite() && scale > 0.0) {
        return Err(shape_err(
            "split_scale",
            format!("scale {scale} is not positive"),
        ));
    }
    let mut exp = 30 - scale.log2().floor() as i32;
    let mut mult = (scale * 2f64.powi(exp)).round();
    while mult >= 2f64.powi(31) {
        exp -= 1;
        mult = (scale * 2f64.powi(exp)).round();
    }
    while mult < 2f64.powi(30) {
        exp += 1;
        mult = (scale * 2f64.powi(exp)).round();
    }
    Ok((mult as i32, exp))
}

/// The integer op interface of exact precision. Implemented by both backends; results are
/// the same bits on both (checked by `tests/exact_bits.rs`).
pub trait ExactBackend {
    /// A tensor of 32-bit words (Fx values, packed int8, tables).
    type Int: Clone + Shaped + std::fmt::Debug;

    /// The most values one integer tensor may hold here (a GPU's storage binding limit);
    /// larger matrices are split by their users.
    fn max_int_values(&self) -> usize {
        usize::MAX
    }
    fn upload_int(&self, data: &[i32], shape: &[usize]) -> Result<Self::Int>;
    /// [`upload_int`](Self::upload_int) of values the caller gives up: a backend that keeps
    /// them in host memory keeps this vector instead of a copy (loading holds one fewer).
    fn upload_int_vec(&self, data: Vec<i32>, shape: &[usize]) -> Result<Self::Int> {
        self.upload_int(&data, shape)
    }
    fn zeros_int(&self, shape: &[usize]) -> Result<Self::Int>;
    fn read_int(&self, t: &Self::Int) -> impl Future<Output = Result<Vec<i32>>>;

    /// Arranges a weight loaded as in the file for this backend's matrix kernels (the CPU
    /// packs it, see [`pack`]; a GPU keeps it). Values are unchanged and nothing else stays
    /// resident.
    fn prepare_qmatrix(&self, w: QMatrix<Self::Int>) -> Result<QMatrix<Self::Int>> {
        Ok(w)
    }
    /// `w`'s weights (prepared) with other scales, `[rows, cols / group, 2]` as in the file:
    /// an output head tied to the embedding table shares its weights.
    fn with_requant(
        &self,
        w: &QMatrix<Self::Int>,
        requant: Self::Int,
    ) -> Result<QMatrix<Self::Int>> {
        if w.layout != WeightLayout::Rows || requant.numel() != w.requant.numel() {
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
        Ok(QMatrix {
            requant,
            ..w.clone()
        })
    }

    /// Quantises Fx `x: [rows, cols]` to int8 in groups of `group` columns.
    fn quantize(&self, x: &Self::Int, group: usize) -> Result<QActs<Self::Int>>;
    /// `x · wᵀ (+ bias)` in Fx from quantised rows. Each group's int8 sum is requantised on its
    /// own and the Fx results are added (wrapping), so smaller groups isolate outliers.
    fn qlinear(&self, x: &QActs<Self::Int>, w: &QMatrix<Self::Int>) -> Result<Self::Int>;
    /// Rows of an int8 table picked by `ids`, in Fx.
    fn qembedding(&self, table: &QMatrix<Self::Int>, ids: &[u32]) -> Result<Self::Int>;
    /// Rows of a word table picked by `ids`.
    fn gather_int(&self, table: &Self::Int, ids: &[u32]) -> Result<Self::Int>;
    /// `a + b`, wrapping.
    fn add_int(&self, a: &Self::Int, b: &Self::Int) -> Result<Self::Int>;
    /// `mul_shift(a, b, shift)` element by element.
    fn mul_int(&self, a: &Self::Int, b: &Self::Int, shift: i32) -> Result<Self::Int>;
    /// LayerNorm (with beta) or RMSNorm over the last dimension; output Fx with `frac` bits.
    fn norm_int(&self, x: &Self::Int, norm: &QNorm<Self::Int>, frac: u32) -> Result<Self::Int>;
    fn act_int(&self, x: &Self::Int, table: &ActTable<Self::Int>) -> Result<Self::Int>;
    /// Rotary embedding on adjacent pairs; row `r` is at position `pos_offset + r`.
    fn rope_int(
        &self,
        x: &Self::Int,
        table: &RopeTable<Self::Int>,
        pos_offset: usize,
    ) -> Result<Self::Int>;
    /// Attention over quantised Q, K, V (one group per head) with [`AttentionParams`]
    /// semantics; output Fx `[batch * q_len, heads * head_dim]`.
    fn attention_int(
        &self,
        q: &QActs<Self::Int>,
        k: &QActs<Self::Int>,
        v: &QActs<Self::Int>,
        kv_lens: &[u32],
        params: &AttentionParams,
        scale: ScoreScale,
    ) -> Result<Self::Int>;
    fn write_rows_int(&self, dst: &mut Self::Int, row: usize, src: &Self::Int) -> Result<()>;
    fn slice_rows_int(&self, x: &Self::Int, start: usize, count: usize) -> Result<Self::Int>;
    /// The same values under another shape with as many of them (shared where the backend
    /// can): e.g. `[rows, heads·head_dim]` as `[rows·heads, head_dim]` to normalise each head.
    fn reshape_int(&self, x: &Self::Int, shape: &[usize]) -> Result<Self::Int>;
    /// Rounded mean over the first `lens[b]` rows of each block of `seq` rows.
    fn mean_pool_int(&self, x: &Self::Int, seq: usize, lens: &[u32]) -> Result<Self::Int>;
}

pub(crate) fn check_qlinear<T: Shaped>(x: &QActs<T>, w: &QMatrix<T>) -> Result<()> {
    if x.cols != w.cols
        || x.group == 0
        || !x.cols.is_multiple_of(x.group)
        || !w.group.is_multiple_of(x.group)
    {
        return Err(shape_err(
            "qlinear",
            format!(
                "input [{}, {}] (groups of {}) against weight [{}, {}] (groups of {})",
                x.rows, x.cols, x.group, w.rows, w.cols, w.group
            ),
        ));
    }
    check_qmatrix("qlinear", w)
}

pub(crate) fn check_qmatrix<T: Shaped>(op: &'static str, w: &QMatrix<T>) -> Result<()> {
    let shape = pack::PackedShape {
        rows: w.rows,
        cols: w.cols,
        group: w.group,
    };
    let sizes = match w.layout {
        WeightLayout::Rows => {
            w.rows * w.cols / 4 == w.data.numel()
                && w.requant.numel() == w.rows * (w.cols / w.group.max(1)) * 2
        }
        WeightLayout::Packed => {
            shape.data_words() == w.data.numel() && w.requant.numel() == shape.requant_words()
        }
    };
    let ok = w.cols.is_multiple_of(4)
        && w.group > 0
        && w.cols.is_multiple_of(w.group)
        && sizes
        && w.bias.as_ref().is_none_or(|b| b.numel() == w.rows);
    if ok {
        Ok(())
    } else {
        Err(shape_err(
            op,
            format!("malformed int8 matrix [{}, {}]", w.rows, w.cols),
        ))
    }
}

pub(crate) fn check_quantize(shape: &[usize], group: usize) -> Result<(usize, usize)> {
    let (rows, cols) = match shape {
        [r, c] => (*r, *c),
        _ => return Err(shape_err("quantize", format!("{shape:?} is not a matrix"))),
    };
    if group == 0 || !group.is_multiple_of(4) || !cols.is_multiple_of(group) {
        return Err(shape_err(
            "quantize",
            format!("{cols} columns in groups of {group} (groups must be multiples of 4)"),
        ));
    }
    Ok((rows, cols))
}

pub(crate) fn check_act_table<T: Shaped>(table: &ActTable<T>) -> Result<()> {
    if table.table.numel() != table.len + 1 || table.step_shift == 0 || table.step_shift > 30 {
        return Err(shape_err("act_int", "malformed activation table"));
    }
    Ok(())
}

/// Rows and columns of a `rope_int` input, checked against the table.
pub(crate) fn check_rope_int<T: Shaped>(
    shape: &[usize],
    table: &RopeTable<T>,
    pos_offset: usize,
) -> Result<(usize, usize)> {
    let cols = *shape.last().unwrap_or(&0);
    let rows = shape
        .iter()
        .product::<usize>()
        .checked_div(cols)
        .unwrap_or(0);
    let hd = table.head_dim;
    if hd == 0
        || !hd.is_multiple_of(2)
        || !cols.is_multiple_of(hd)
        || table.table.numel() != table.positions * hd
        || pos_offset + rows > table.positions
    {
        return Err(shape_err(
            "rope_int",
            format!(
                "{rows} rows of {cols} at position {pos_offset} with a table of {} positions × {hd}",
                table.positions
            ),
        ));
    }
    Ok((rows, cols))
}

pub(crate) fn check_norm<T: Shaped>(shape: &[usize], norm: &QNorm<T>) -> Result<(usize, usize)> {
    let cols = *shape.last().unwrap_or(&0);
    let rows = shape
        .iter()
        .product::<usize>()
        .checked_div(cols)
        .unwrap_or(0);
    if cols == 0
        || cols > MAX_NORM_COLS
        || norm.gamma.numel() != cols
        || norm.beta.as_ref().is_some_and(|b| b.numel() != cols)
    {
        return Err(shape_err(
            "norm_int",
            format!("{cols} columns (at most {MAX_NORM_COLS}) and matching gamma/beta"),
        ));
    }
    Ok((rows, cols))
}

pub(crate) fn check_attention_int<T>(
    q: &QActs<T>,
    k: &QActs<T>,
    v: &QActs<T>,
    kv_lens: &[u32],
    p: &AttentionParams,
) -> Result<()> {
    p.validate(
        &[q.rows, q.cols],
        &[k.rows, k.cols],
        &[v.rows, v.cols],
        kv_lens,
    )?;
    if q.group != p.head_dim || k.group != p.head_dim || v.group != p.head_dim {
        return Err(shape_err(
            "attention_int",
            "q, k and v must be quantised per head".to_string(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The quantisation as first written, with a division per value.
    fn quantize_by_division(m: u32, reduced: u32) -> u32 {
        (m * 2 * Q_MAX as u32 + reduced) / (2 * reduced)
    }

    #[test]
    fn quantisation_by_multiply_equals_the_division() {
        // Every m for the extreme and a spread of divisors, then random pairs.
        let mut divisors: Vec<u32> = (1..=64).chain((1 << 15) - 64..1 << 15).collect();
        divisors.extend(
            (0..15)
                .map(|b| 1u32 << b)
                .chain((0..15).map(|b| (1u32 << b) + 1)),
        );
        let mut state = 0x0123_4567_89ab_cdefu64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        divisors.extend((0..64).map(|_| (next() % ((1 << 15) - 1)) as u32 + 1));
        for reduced in divisors {
            // A group whose largest value is `reduced` (shift 0) and holds every m below it.
            let x: Vec<i32> = (0..=reduced as i32).flat_map(|m| [m, -m]).collect();
            let mut q = vec![0i8; x.len()];
            let s = quantize_group(&x, &mut q);
            assert_eq!((s.reduced, s.shift), (reduced as i32, 0));
            for (&v, &got) in x.iter().zip(&q) {
                let want = quantize_by_division(v.unsigned_abs(), reduced) as i32;
                assert_eq!(i32::from(got), want * v.signum(), "m {v} reduced {reduced}");
            }
        }
    }

    #[test]
    fn mul_shift_rounds_half_away_from_zero_and_saturates() {
        assert_eq!(mul_shift(3, 1, 1), 2);
        assert_eq!(mul_shift(-3, 1, 1), -2);
        assert_eq!(mul_shift(5, 1, 2), 1);
        assert_eq!(mul_shift(6, 1, 2), 2);
        assert_eq!(mul_shift(i32::MAX, i32::MAX, 0), i32::MAX);
        assert_eq!(mul_shift(i32::MIN, i32::MIN, 62), 1);
        assert_eq!(mul_shift(i32::MIN, 1, 0), -i32::MAX);
        assert_eq!(mul_shift(3, 5, -2), 60);
        assert_eq!(mul_shift(1, 1, -31), i32::MAX);
        assert_eq!(mul_shift(0, 1, -40), 0);
        assert_eq!(mul_shift(7, 7, 70), 0);
    }

    #[test]
    fn isqrt_is_the_floor_root() {
        for n in (0..100_000u32).chain([u32::MAX, u32::MAX - 1, 1 << 30, (1 << 30) - 1]) {
            let r = isqrt(n) as u64;
            assert!(r * r <= n as u64 && (r + 1) * (r + 1) > n as u64, "{n}");
        }
    }

    #[test]
    fn quantize_group_maps_the_peak_to_127() {
        let mut q = [0i8; 4];
        let s = quantize_group(&[100, -50, 0, 1], &mut q);
        assert_eq!(q, [127, -64, 0, 1]);
        assert_eq!(
            s,
            GroupScale {
                reduced: 100,
                shift: 0
            }
        );
        let s = quantize_group(&[1 << 20, -(1 << 19), 3, 0], &mut q);
        assert_eq!(q, [127, -64, 0, 0]);
        assert_eq!(s.reduced << s.shift, 1 << 20);
        assert_eq!(quantize_group(&[0; 4], &mut q).reduced, 0);
    }

    #[test]
    fn exp2_weights_are_monotone_and_anchored() {
        assert_eq!(exp2_neg_q15(0), 32768);
        assert_eq!(exp2_neg_q15(1 << SCORE_FRAC), 16384);
        assert_eq!(exp2_neg_q15(16 << SCORE_FRAC), 0);
        let mut last = u32::MAX;
        for d in (0..(8 << SCORE_FRAC)).step_by(97) {
            let e = exp2_neg_q15(d);
            assert!(e <= last);
            let want = 32768.0 * 2f64.powf(-(d as f64) / 65536.0);
            assert!((e as f64 - want).abs() <= 1.0, "{d}: {e} vs {want}");
            last = e;
        }
    }

    #[test]
    fn split_scale_keeps_thirty_bits() {
        for s in [1e-9, 3.7e-5, 0.5, 1.0, 1234.5] {
            let (m, e) = split_scale(s).unwrap();
            assert!((1 << 30..=i32::MAX).contains(&m));
            let back = m as f64 * 2f64.powi(-e);
            assert!((back / s - 1.0).abs() < 1e-9);
        }
        assert!(split_scale(0.0).is_err());
        assert!(split_scale(f64::NAN).is_err());
    }
}
