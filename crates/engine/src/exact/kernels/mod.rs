//! The CPU's int8 matrix kernels for exact precision: `x · wᵀ` on packed weights
//! ([`super::pack`]), each group's sum requantised as [`super::requantize`] specifies.
//!
//! Integer sums are exact, so every kernel gives the same bits whatever its instruction set
//! or summation order; what differs is speed. The kernel is chosen at run time from what the
//! processor has ([`Kernel::best`]), and a caller can force any supported one on its thread
//! ([`with_kernel`]) to compare them: the tests and the self-check do.
//!
//! Must not depend on any backend or model: slices in, slices out.

mod scalar;
#[cfg(all(target_arch = "wasm32", target_feature = "relaxed-simd"))]
mod wasm;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::cell::Cell;

use super::{GroupScale, pack::PackedShape, pack::ScaleRange, requantize};

/// One int8 matrix kernel (an instruction-set path).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Plain Rust: the reference, and what a processor without the others runs (the compiler
    /// vectorises it where it can, SIMD128 in the wasm build).
    Scalar,
    /// x86-64 AVX2: `vpmaddubsw` / `vpmaddwd` on eight channels.
    Avx2,
    /// x86-64 256-bit VNNI: `vpdpbusd` on eight channels (AVX-VNNI, or AVX-512 VNNI with VL).
    AvxVnni,
    /// x86-64 AVX-512 VNNI: `vpdpbusd` on sixteen channels.
    Avx512Vnni,
    /// wasm relaxed SIMD: `i32x4.relaxed_dot_i8x16_i7x16_add_s` (the relaxed-SIMD build).
    WasmRelaxed,
}

impl Kernel {
    pub const ALL: [Kernel; 5] = [
        Kernel::Scalar,
        Kernel::Avx2,
        Kernel::AvxVnni,
        Kernel::Avx512Vnni,
        Kernel::WasmRelaxed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::AvxVnni => "avx-vnni",
            Kernel::Avx512Vnni => "avx512-vnni",
            Kernel::WasmRelaxed => "wasm-relaxed-simd",
        }
    }

    /// Whether this processor (and build) can run the kernel.
    pub fn supported(self) -> bool {
        match self {
            Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => x86::avx_vnni_kind().is_some(),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(all(target_arch = "wasm32", target_feature = "relaxed-simd"))]
            Kernel::WasmRelaxed => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every kernel this processor can run, the reference first.
    pub fn supported_all() -> Vec<Kernel> {
        Kernel::ALL.into_iter().filter(|k| k.supported()).collect()
    }

    /// The fastest supported kernel.
    pub fn best() -> Kernel {
        [
            Kernel::Avx512Vnni,
            Kernel::AvxVnni,
            Kernel::Avx2,
            Kernel::WasmRelaxed,
        ]
        .into_iter()
        .find(|k| k.supported())
        .unwrap_or(Kernel::Scalar)
    }

    /// The kernel exact matrix products on this thread use now.
    pub fn active() -> Kernel {
        FORCED
            .with(Cell::get)
            .unwrap_or_else(|| *BEST.get_or_init(Kernel::best))
    }
}

impl std::fmt::Display for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();

thread_local! {
    static FORCED: Cell<Option<Kernel>> = const { Cell::new(None) };
}

/// Runs `f` with exact matrix products on this thread forced to `kernel`; `None` when this
/// processor cannot run it.
pub fn with_kernel<R>(kernel: Kernel, f: impl FnOnce() -> R) -> Option<R> {
    if !kernel.supported() {
        return None;
    }
    struct Restore(Option<Kernel>);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FORCED.with(|c| c.replace(Some(kernel))));
    Some(f())
}

/// One `qlinear` on packed weights, with validated shapes.
pub(crate) struct Job<'a> {
    /// `[m, k / 4]` words of four activations each (the first in the lowest byte), each in
    /// `-127..=127` (what [`super::quantize_group`] gives).
    pub x: &'a [i32],
    /// `[m, k / group, 2]`: each group's [`GroupScale`].
    pub x_scales: &'a [i32],
    /// Packed weights (`w + 128`), see [`super::pack`].
    pub w: &'a [u8],
    /// Packed `(M, E)` and trailer.
    pub requant: &'a [i32],
    pub bias: Option<&'a [i32]>,
    /// The weight: `rows` = output channels `n`, `cols` = `k`, `group` = columns per scale.
    pub shape: PackedShape,
    pub m: usize,
    /// Activation group (divides the weight's group).
    pub group: usize,
}

/// The sizes every kernel walks the packed layout with.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    /// Input columns `k` and output channels `n`.
    pub k: usize,
    pub n: usize,
    /// Activation groups per row, and four-byte quads per group.
    pub groups: usize,
    pub quads: usize,
    /// Activation groups per weight scale.
    pub per_scale: usize,
    /// Bytes of one 16-channel block's weights, words of its scales.
    pub block_bytes: usize,
    pub block_scales: usize,
}

impl Job<'_> {
    pub fn groups(&self) -> usize {
        self.shape.cols / self.group
    }

    pub fn dims(&self) -> Dims {
        let s = self.shape;
        Dims {
            k: s.cols,
            n: s.rows,
            groups: self.groups(),
            quads: self.group / 4,
            per_scale: s.group / self.group,
            block_bytes: s.quads() * 4 * super::pack::LANES,
            block_scales: s.w_blocks() * 2 * super::pack::LANES,
        }
    }

    fn assert_valid(&self) {
        let s = self.shape;
        assert!(
            self.group > 0 && self.group.is_multiple_of(4) && s.group.is_multiple_of(self.group)
        );
        assert_eq!(self.x.len(), self.m * s.cols / 4);
        assert_eq!(self.x_scales.len(), 2 * self.m * self.groups());
        assert_eq!(self.w.len(), 4 * s.data_words());
        assert_eq!(self.requant.len(), s.requant_words());
        assert!(self.bias.is_none_or(|b| b.len() == s.rows));
    }

    /// Whether the branch-free requantisation ([`requantize_in_range`]) equals [`requantize`]
    /// for every group of this product: activation scales as [`super::quantize_group`] makes
    /// them (`reduced < 2^15`, `shift` in `0..=17`), multipliers non-negative, and every final
    /// shift `E - 15 - shift` in `1..=62`.
    fn fast_requant_applies(&self) -> bool {
        let (mut min_shift, mut max_shift) = (i32::MAX, i32::MIN);
        for s in self.x_scales.chunks_exact(2) {
            if !(0..1 << 15).contains(&s[0]) {
                return false;
            }
            min_shift = min_shift.min(s[1]);
            max_shift = max_shift.max(s[1]);
        }
        if min_shift == i32::MAX {
            return true; // no rows
        }
        let range = ScaleRange::read(self.requant);
        min_shift >= 0
            && max_shift <= 17
            && range.mults_non_negative
            && i64::from(range.exp_min) - 15 - i64::from(max_shift) >= 1
            && i64::from(range.exp_max) - 15 - i64::from(min_shift) <= 62
    }

    /// The activations as bytes, `[m, k]`.
    fn bytes(&self) -> &[i8] {
        bytemuck::cast_slice(self.x)
    }

    /// `Σ x` over each group of each row: the kernels that take `w + 128` subtract `128 · Σx`.
    #[cfg_attr(
        not(any(
            target_arch = "x86_64",
            all(target_arch = "wasm32", target_feature = "relaxed-simd")
        )),
        allow(dead_code)
    )]
    fn group_sums(&self) -> Vec<i32> {
        self.bytes()
            .chunks_exact(self.group)
            .map(|g| g.iter().map(|&v| i32::from(v)).sum())
            .collect()
    }
}

/// `out[m, n] = x · wᵀ (+ bias)` with the active kernel.
pub(crate) fn qlinear(job: &Job<'_>, out: &mut [i32]) {
    job.assert_valid();
    assert_eq!(out.len(), job.m * job.shape.rows);
    if job.m == 0 || job.shape.rows == 0 {
        return;
    }
    let kernel = Kernel::active();
    if !job.fast_requant_applies() {
        // Scales no model file has: the general form, on the reference kernel.
        return scalar::qlinear(job, out, false);
    }
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 | Kernel::AvxVnni | Kernel::Avx512Vnni => x86::qlinear(kernel, job, out),
        #[cfg(all(target_arch = "wasm32", target_feature = "relaxed-simd"))]
        Kernel::WasmRelaxed => wasm::qlinear(job, out),
        _ => scalar::qlinear(job, out, true),
    }
}

/// [`requantize`] for in-range scales (see [`Job::fast_requant_applies`]), without branches.
#[inline(always)]
pub(crate) fn requantize_in_range(acc: i32, reduced: u32, shift: i32, mult: u32, exp: i32) -> i32 {
    // reduced < 2^15 and mult < 2^31: the rounded product fits 31 bits, as in `mul_shift`.
    let combined = (u64::from(reduced) * u64::from(mult) + (1 << 14)) >> 15;
    let s = (exp - 15 - shift) as u32;
    let magnitude = ((u64::from(acc.unsigned_abs()) * combined + (1u64 << (s - 1))) >> s)
        .min(i32::MAX as u64) as i32;
    if acc < 0 { -magnitude } else { magnitude }
}

/// One group's requantisation, in the fast or the general form.
#[inline(always)]
fn requant_one(fast: bool, acc: i32, x: GroupScale, mult: i32, exp: i32) -> i32 {
    if fast {
        requantize_in_range(acc, x.reduced as u32, x.shift, mult as u32, exp)
    } else {
        requantize(acc, x, mult, exp)
    }
}

#[cfg(test)]
mod tests;
