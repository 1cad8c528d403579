//! The reference kernel: plain loops over the packed layout, any scales.

use super::{Job, requant_one};
use crate::exact::{
    GroupScale,
    pack::{LANES, lane_slot},
};

/// `out = x · wᵀ (+ bias)`; `fast`: the scales passed [`Job::fast_requant_applies`].
pub(super) fn qlinear(job: &Job<'_>, out: &mut [i32], fast: bool) {
    let s = job.shape;
    let super::Dims {
        k,
        n,
        groups,
        quads: quads_per_group,
        per_scale: groups_per_scale,
        block_bytes,
        block_scales,
    } = job.dims();
    for (r, (xrow, orow)) in job
        .bytes()
        .chunks_exact(k)
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
                let mut acc = [0i32; LANES];
                for q in g * quads_per_group..(g + 1) * quads_per_group {
                    let xq = &xrow[4 * q..4 * q + 4];
                    let wq = &wblock[q * 4 * LANES..(q + 1) * 4 * LANES];
                    for (a, w4) in acc.iter_mut().zip(wq.chunks_exact(4)) {
                        let d: i32 = xq
                            .iter()
                            .zip(w4)
                            .map(|(&x, &w)| i32::from(x) * (i32::from(w) - 128))
                            .sum();
                        *a = a.wrapping_add(d);
                    }
                }
                let at = 2 * (r * groups + g);
                let scale = GroupScale {
                    reduced: job.x_scales[at],
                    shift: job.x_scales[at + 1],
                };
                let pairs = &scales[(g / groups_per_scale) * 2 * LANES..];
                for (lane, (yl, &a)) in y.iter_mut().zip(&acc).enumerate() {
                    let slot = lane_slot(lane);
                    let part = requant_one(fast, a, scale, pairs[slot], pairs[slot + LANES]);
                    *yl = yl.wrapping_add(part);
                }
            }
            orow[b * LANES..b * LANES + valid].copy_from_slice(&y[..valid]);
        }
    }
}
