//! x86-64 kernels on the packed layout: AVX-512 VNNI (sixteen channels per vector), 256-bit
//! VNNI (AVX-VNNI, or AVX-512 VNNI with VL) and AVX2 (eight channels per vector).
//!
//! Each works on a tile of up to [`MR`] activation rows against one block of sixteen channels.
//! Per activation group it forms the int8 sums of every (row, channel) in registers, then
//! requantises them together: even and odd channels in 64-bit lanes, `(|acc| · combined)`
//! exact in 64 bits, the rounding of [`super::requantize_in_range`], the sign put back last.
//!
//! The VNNI kernels take the packed `w + 128` as `vpdpbusd`'s unsigned operand and start each
//! group's sum at `-128 · Σx`. AVX2 has no such product without saturation, so it takes
//! `vpmaddubsw(|w|, sign(x, w))`, whose pairs stay within ±32 512 for every int8 weight and
//! every activation in `-127..=127`.

use std::arch::x86_64::*;

use super::{Job, Kernel};
use crate::exact::pack::LANES;

/// Activation rows per tile: their sums and outputs stay in registers.
const MR: usize = 4;

/// Which encoding of the 256-bit `vpdpbusd` this processor has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Vnni256 {
    /// AVX-VNNI (VEX).
    Vex,
    /// AVX-512 VNNI with AVX-512 VL (EVEX).
    Evex,
}

pub(super) fn avx_vnni_kind() -> Option<Vnni256> {
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("avxvnni") {
        Some(Vnni256::Vex)
    } else if is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
    {
        Some(Vnni256::Evex)
    } else {
        None
    }
}

/// Runs `kernel` (an x86 one this processor supports) over every row tile.
pub(super) fn qlinear(kernel: Kernel, job: &Job<'_>, out: &mut [i32]) {
    assert!(kernel.supported(), "{kernel} is not supported here");
    let sums = job.group_sums();
    let vnni256 = avx_vnni_kind();
    let mut r = 0;
    while r < job.m {
        let rows = (job.m - r).min(MR);
        macro_rules! tile {
            ($f4:ident, $f3:ident, $f2:ident, $f1:ident) => {
                // SAFETY: `kernel.supported()` (asserted above) checked the features these
                // functions are compiled with.
                unsafe {
                    match rows {
                        4 => $f4(job, &sums, r, out),
                        3 => $f3(job, &sums, r, out),
                        2 => $f2(job, &sums, r, out),
                        _ => $f1(job, &sums, r, out),
                    }
                }
            };
        }
        match (kernel, vnni256) {
            (Kernel::Avx512Vnni, _) => {
                tile!(tile_avx512_4, tile_avx512_3, tile_avx512_2, tile_avx512_1)
            }
            (Kernel::AvxVnni, Some(Vnni256::Vex)) => {
                tile!(
                    tile_avx_vnni_4,
                    tile_avx_vnni_3,
                    tile_avx_vnni_2,
                    tile_avx_vnni_1
                )
            }
            (Kernel::AvxVnni, _) => {
                tile!(
                    tile_avx512_vl_4,
                    tile_avx512_vl_3,
                    tile_avx512_vl_2,
                    tile_avx512_vl_1
                )
            }
            _ => tile!(tile_avx2_4, tile_avx2_3, tile_avx2_2, tile_avx2_1),
        }
        r += rows;
    }
}

/// The bias of one block's valid channels (0 elsewhere).
fn bias_lanes(bias: Option<&[i32]>, first: usize, valid: usize) -> [i32; LANES] {
    let mut lanes = [0i32; LANES];
    if let Some(b) = bias {
        lanes[..valid].copy_from_slice(&b[first..first + valid]);
    }
    lanes
}

/// Sixteen sums of one group requantised and added to `y`: [`super::requantize_in_range`]
/// for each lane. `me`/`mo`: the multipliers of the even/odd channels in 64-bit lanes,
/// `ee`/`eo` their exponents.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
fn requant16(
    acc: __m512i,
    y: __m512i,
    (me, mo, ee, eo): (__m512i, __m512i, __m512i, __m512i),
    reduced: i32,
    shift: i32,
) -> __m512i {
    let rb = _mm512_set1_epi64(i64::from(reduced));
    let half = _mm512_set1_epi64(1 << 14);
    let ce = _mm512_srli_epi64::<15>(_mm512_add_epi64(_mm512_mul_epu32(me, rb), half));
    let co = _mm512_srli_epi64::<15>(_mm512_add_epi64(_mm512_mul_epu32(mo, rb), half));
    let a = _mm512_abs_epi32(acc);
    let pe = _mm512_mul_epu32(a, ce);
    let po = _mm512_mul_epu32(_mm512_srli_epi64::<32>(a), co);
    // (p + 2^(s-1)) >> s == ((p >> (s-1)) + 1) >> 1, with s - 1 = E - 16 - shift >= 0.
    let sb = _mm512_set1_epi64(i64::from(shift) + 16);
    let one = _mm512_set1_epi64(1);
    let max = _mm512_set1_epi64(i64::from(i32::MAX));
    let round = |p: __m512i, e: __m512i| {
        let v = _mm512_add_epi64(_mm512_srlv_epi64(p, _mm512_sub_epi64(e, sb)), one);
        _mm512_min_epu64(_mm512_srli_epi64::<1>(v), max)
    };
    let r = _mm512_or_si512(round(pe, ee), _mm512_slli_epi64::<32>(round(po, eo)));
    let negative = _mm512_cmplt_epi32_mask(acc, _mm512_setzero_si512());
    let added = _mm512_mask_add_epi32(y, !negative, y, r);
    _mm512_mask_sub_epi32(added, negative, y, r)
}

/// The even/odd multipliers and exponents of one block's scales `p` (32 words) for the
/// channels in 64-bit lanes `first..first + lanes` of each half.
#[target_feature(enable = "avx512f")]
fn scales16(p: &[i32]) -> (__m512i, __m512i, __m512i, __m512i) {
    assert!(p.len() >= 2 * LANES);
    // SAFETY: each load reads 8 words of `p`, which has 32 (asserted above); `loadu` has no
    // alignment requirement.
    unsafe {
        let load = |at: usize| _mm512_cvtepu32_epi64(_mm256_loadu_si256(p[at..].as_ptr().cast()));
        (load(0), load(8), load(16), load(24))
    }
}

/// A tile of `$r` rows (`$i`: `0..$r`, spelled out so that every sum and output stays in a
/// register) against each block of sixteen channels, with AVX-512 VNNI.
macro_rules! tile512 {
    ($name:ident, $r:literal, [$($i:literal),*]) => {
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
        fn $name(job: &Job<'_>, sums: &[i32], r0: usize, out: &mut [i32]) {
            const R: usize = $r;
            let s = job.shape;
            let crate::exact::kernels::Dims { k, n, groups, quads, per_scale, block_bytes, block_scales } =
                job.dims();
            let kq = k / 4;
            let x = &job.x[r0 * kq..(r0 + R) * kq];
            let xs = &job.x_scales[2 * r0 * groups..2 * (r0 + R) * groups];
            let sums = &sums[r0 * groups..(r0 + R) * groups];
            for b in 0..s.blocks() {
                let valid = (n - b * LANES).min(LANES);
                let wblock = &job.w[b * block_bytes..(b + 1) * block_bytes];
                let scales = &job.requant[b * block_scales..(b + 1) * block_scales];
                let init = bias_lanes(job.bias, b * LANES, valid);
                // SAFETY: `init` is 16 words; `loadu` has no alignment requirement.
                let mut y = [unsafe { _mm512_loadu_si512(init.as_ptr().cast()) }; R];
                for g in 0..groups {
                    let mut acc = [_mm512_setzero_si512(); R];
                    $(acc[$i] = _mm512_set1_epi32(sums[$i * groups + g].wrapping_mul(-128));)*
                    let wg = &wblock[g * quads * 64..(g + 1) * quads * 64];
                    let xg = g * quads;
                    for q in 0..quads {
                        // SAFETY: `wg` has `quads · 64` bytes; `loadu` has no alignment
                        // requirement.
                        let wv = unsafe { _mm512_loadu_si512(wg[q * 64..].as_ptr().cast()) };
                        $(acc[$i] = _mm512_dpbusd_epi32(
                            acc[$i],
                            wv,
                            _mm512_set1_epi32(x[$i * kq + xg + q]),
                        );)*
                    }
                    let p = scales16(&scales[(g / per_scale) * 2 * LANES..]);
                    $(y[$i] = requant16(
                        acc[$i],
                        y[$i],
                        p,
                        xs[2 * ($i * groups + g)],
                        xs[2 * ($i * groups + g) + 1],
                    );)*
                }
                for (i, yi) in y.iter().enumerate() {
                    let mut lanes = [0i32; LANES];
                    // SAFETY: `lanes` is 16 words; `storeu` has no alignment requirement.
                    unsafe { _mm512_storeu_si512(lanes.as_mut_ptr().cast(), *yi) };
                    let at = (r0 + i) * n + b * LANES;
                    out[at..at + valid].copy_from_slice(&lanes[..valid]);
                }
            }
        }
    };
}

tile512!(tile_avx512_4, 4, [0, 1, 2, 3]);
tile512!(tile_avx512_3, 3, [0, 1, 2]);
tile512!(tile_avx512_2, 2, [0, 1]);
tile512!(tile_avx512_1, 1, [0]);

/// [`requant16`] for eight channels with AVX2 (no unsigned 64-bit minimum: a compare).
#[target_feature(enable = "avx2")]
fn requant8(
    acc: __m256i,
    y: __m256i,
    (me, mo, ee, eo): (__m256i, __m256i, __m256i, __m256i),
    reduced: i32,
    shift: i32,
) -> __m256i {
    let rb = _mm256_set1_epi64x(i64::from(reduced));
    let half = _mm256_set1_epi64x(1 << 14);
    let ce = _mm256_srli_epi64::<15>(_mm256_add_epi64(_mm256_mul_epu32(me, rb), half));
    let co = _mm256_srli_epi64::<15>(_mm256_add_epi64(_mm256_mul_epu32(mo, rb), half));
    let a = _mm256_abs_epi32(acc);
    let pe = _mm256_mul_epu32(a, ce);
    let po = _mm256_mul_epu32(_mm256_srli_epi64::<32>(a), co);
    let sb = _mm256_set1_epi64x(i64::from(shift) + 16);
    let one = _mm256_set1_epi64x(1);
    let max = _mm256_set1_epi64x(i64::from(i32::MAX));
    let round = |p: __m256i, e: __m256i| {
        let v = _mm256_add_epi64(_mm256_srlv_epi64(p, _mm256_sub_epi64(e, sb)), one);
        let v = _mm256_srli_epi64::<1>(v); // < 2^62: signed compares are right
        _mm256_blendv_epi8(v, max, _mm256_cmpgt_epi64(v, max))
    };
    let r = _mm256_or_si256(round(pe, ee), _mm256_slli_epi64::<32>(round(po, eo)));
    _mm256_add_epi32(y, _mm256_sign_epi32(r, acc))
}

/// The scales of half `h` (channels `8h..8h + 8`) of a block, see [`scales16`].
#[target_feature(enable = "avx2")]
fn scales8(p: &[i32], h: usize) -> (__m256i, __m256i, __m256i, __m256i) {
    assert!(p.len() >= 2 * LANES && h < 2);
    // SAFETY: each load reads 4 words at most at 24 + 4 + 4 = 32 <= p.len(); `loadu` has no
    // alignment requirement.
    unsafe {
        let load =
            |at: usize| _mm256_cvtepu32_epi64(_mm_loadu_si128(p[at + 4 * h..].as_ptr().cast()));
        (load(0), load(8), load(16), load(24))
    }
}

/// The 256-bit kernels differ only in the group's int8 sum; `$dot(acc, w, x)` adds four
/// products per lane, `$comp` says whether `w` is taken as `w + 128` (start at `-128 · Σx`).
macro_rules! tile256 {
    ($name:ident, $features:literal, $comp:literal, $dot:expr, $r:literal, [$($i:literal),*]) => {
        #[target_feature(enable = $features)]
        fn $name(job: &Job<'_>, sums: &[i32], r0: usize, out: &mut [i32]) {
            const R: usize = $r;
            let s = job.shape;
            let crate::exact::kernels::Dims { k, n, groups, quads, per_scale, block_bytes, block_scales } =
                job.dims();
            let kq = k / 4;
            let x = &job.x[r0 * kq..(r0 + R) * kq];
            let xs = &job.x_scales[2 * r0 * groups..2 * (r0 + R) * groups];
            let sums = &sums[r0 * groups..(r0 + R) * groups];
            let dot = $dot;
            for b in 0..s.blocks() {
                let wblock = &job.w[b * block_bytes..(b + 1) * block_bytes];
                let scales = &job.requant[b * block_scales..(b + 1) * block_scales];
                for h in 0..2 {
                    let first = b * LANES + 8 * h;
                    if first >= n {
                        break;
                    }
                    let valid = (n - first).min(8);
                    let init = bias_lanes(job.bias, first, valid);
                    // SAFETY: `init` is 16 words; `loadu` has no alignment requirement.
                    let mut y = [unsafe { _mm256_loadu_si256(init.as_ptr().cast()) }; R];
                    for g in 0..groups {
                        let mut acc = [_mm256_setzero_si256(); R];
                        if $comp {
                            $(acc[$i] =
                                _mm256_set1_epi32(sums[$i * groups + g].wrapping_mul(-128));)*
                        }
                        let wg = &wblock[g * quads * 64..(g + 1) * quads * 64];
                        for q in 0..quads {
                            // SAFETY: 32 bytes at `q · 64 + 32h` of `wg`, which has
                            // `quads · 64`; `loadu` has no alignment requirement.
                            let wv = unsafe {
                                _mm256_loadu_si256(wg[q * 64 + 32 * h..].as_ptr().cast())
                            };
                            $(acc[$i] = dot(
                                acc[$i],
                                wv,
                                _mm256_set1_epi32(x[$i * kq + g * quads + q]),
                            );)*
                        }
                        let p = scales8(&scales[(g / per_scale) * 2 * LANES..], h);
                        $(y[$i] = requant8(
                            acc[$i],
                            y[$i],
                            p,
                            xs[2 * ($i * groups + g)],
                            xs[2 * ($i * groups + g) + 1],
                        );)*
                    }
                    for (i, yi) in y.iter().enumerate() {
                        let mut lanes = [0i32; 8];
                        // SAFETY: `lanes` is 8 words; `storeu` has no alignment requirement.
                        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), *yi) };
                        let at = (r0 + i) * n + first;
                        out[at..at + valid].copy_from_slice(&lanes[..valid]);
                    }
                }
            }
        }
    };
}

/// The 256-bit kernels' int8 sums.
macro_rules! dot_avx2 {
    () => {
        |acc: __m256i, wv: __m256i, xq: __m256i| {
            let w = _mm256_xor_si256(wv, _mm256_set1_epi8(-128));
            let pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(xq, w));
            _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
        }
    };
}
macro_rules! dot_avx_vnni {
    () => {
        |acc, wv, xq| _mm256_dpbusd_avx_epi32(acc, wv, xq)
    };
}
macro_rules! dot_avx512_vl {
    () => {
        |acc, wv, xq| _mm256_dpbusd_epi32(acc, wv, xq)
    };
}

tile256!(tile_avx2_4, "avx2", false, dot_avx2!(), 4, [0, 1, 2, 3]);
tile256!(tile_avx2_3, "avx2", false, dot_avx2!(), 3, [0, 1, 2]);
tile256!(tile_avx2_2, "avx2", false, dot_avx2!(), 2, [0, 1]);
tile256!(tile_avx2_1, "avx2", false, dot_avx2!(), 1, [0]);
tile256!(
    tile_avx_vnni_4,
    "avx2,avxvnni",
    true,
    dot_avx_vnni!(),
    4,
    [0, 1, 2, 3]
);
tile256!(
    tile_avx_vnni_3,
    "avx2,avxvnni",
    true,
    dot_avx_vnni!(),
    3,
    [0, 1, 2]
);
tile256!(
    tile_avx_vnni_2,
    "avx2,avxvnni",
    true,
    dot_avx_vnni!(),
    2,
    [0, 1]
);
tile256!(
    tile_avx_vnni_1,
    "avx2,avxvnni",
    true,
    dot_avx_vnni!(),
    1,
    [0]
);
tile256!(
    tile_avx512_vl_4,
    "avx2,avx512f,avx512vl,avx512vnni",
    true,
    dot_avx512_vl!(),
    4,
    [0, 1, 2, 3]
);
tile256!(
    tile_avx512_vl_3,
    "avx2,avx512f,avx512vl,avx512vnni",
    true,
    dot_avx512_vl!(),
    3,
    [0, 1, 2]
);
tile256!(
    tile_avx512_vl_2,
    "avx2,avx512f,avx512vl,avx512vnni",
    true,
    dot_avx512_vl!(),
    2,
    [0, 1]
);
tile256!(
    tile_avx512_vl_1,
    "avx2,avx512f,avx512vl,avx512vnni",
    true,
    dot_avx512_vl!(),
    1,
    [0]
);
