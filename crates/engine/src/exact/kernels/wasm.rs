//! The wasm relaxed-SIMD kernel on the packed layout.
//!
//! `i32x4.relaxed_dot_i8x16_i7x16_add_s` gives the same result on every engine only when its
//! second operand's bytes have the top bit clear, so each packed byte `u = w + 128` is split
//! into `u & 0x7f` and `u >> 7`: `Σ x·u = Σ x·(u & 0x7f) + 128 · Σ x·(u >> 7)`, and the group's
//! sum is that minus `128 · Σx`. The pairwise i16 sums stay within ±32 512, so no engine
//! saturates them.

use core::arch::wasm32::*;

use super::{Job, requantize_in_range};
use crate::exact::pack::{LANES, lane_slot};

pub(super) fn qlinear(job: &Job<'_>, out: &mut [i32]) {
    let s = job.shape;
    let super::Dims {
        k,
        n,
        groups,
        quads,
        per_scale,
        block_bytes,
        block_scales,
    } = job.dims();
    let sums = job.group_sums();
    let low7 = i8x16_splat(0x7f);
    // Rows of `k / 4` words.
    for (r, (xrow, orow)) in job
        .x
        .chunks_exact(k / 4)
        .zip(out.chunks_exact_mut(n))
        .enumerate()
    {
        for b in 0..s.blocks() {
            let valid = (n - b * LANES).min(LANES);
            let wblock = &job.w[b * block_bytes..(b + 1) * block_bytes];
            let scales = &job.requant[b * block_scales..(b + 1) * block_scales];
            let mut y = [0i32; LANES];
            if let Some(bias) = job.bias {
                y[..valid].copy_from_slice(&bias[b * LANES..b * LANES + valid]);
            }
            for g in 0..groups {
                let mut low = [i32x4_splat(0); 4];
                let mut high = [i32x4_splat(0); 4];
                let wg = &wblock[g * quads * 64..(g + 1) * quads * 64];
                for q in 0..quads {
                    let xq = i32x4_splat(xrow[g * quads + q]);
                    for v in 0..4 {
                        let w = &wg[q * 64 + 16 * v..q * 64 + 16 * v + 16];
                        // SAFETY: `w` is 16 bytes; `v128_load` has no alignment requirement.
                        let wv = unsafe { v128_load(w.as_ptr().cast()) };
                        low[v] = i32x4_relaxed_dot_i8x16_i7x16_add(xq, v128_and(wv, low7), low[v]);
                        high[v] = i32x4_relaxed_dot_i8x16_i7x16_add(xq, u8x16_shr(wv, 7), high[v]);
                    }
                }
                let comp = sums[r * groups + g].wrapping_mul(-128);
                let mut acc = [0i32; LANES];
                for v in 0..4 {
                    let sum =
                        i32x4_add(i32x4_add(low[v], i32x4_shl(high[v], 7)), i32x4_splat(comp));
                    // SAFETY: `acc[4v..4v + 4]` is 16 bytes; `v128_store` has no alignment
                    // requirement.
                    unsafe { v128_store(acc[4 * v..].as_mut_ptr().cast(), sum) };
                }
                let at = 2 * (r * groups + g);
                let (reduced, shift) = (job.x_scales[at] as u32, job.x_scales[at + 1]);
                let pairs = &scales[(g / per_scale) * 2 * LANES..];
                for (lane, (yl, &a)) in y.iter_mut().zip(&acc).enumerate() {
                    let slot = lane_slot(lane);
                    let part = requantize_in_range(
                        a,
                        reduced,
                        shift,
                        pairs[slot] as u32,
                        pairs[slot + LANES],
                    );
                    *yl = yl.wrapping_add(part);
                }
            }
            orow[b * LANES..b * LANES + valid].copy_from_slice(&y[..valid]);
        }
    }
}
