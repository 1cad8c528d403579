//! Int8 weights packed for the CPU kernels ([`super::kernels`]): the layout that lets one
//! vector instruction multiply a broadcast group of four activations by sixteen output
//! channels at once (`vpdpbusd`, `i32x4.relaxed_dot_i8x16_i7x16_add`, `sdot`).
//!
//! Packing changes where bytes sit, never a value: every kernel on the packed layout gives the
//! bits of the specification in [`super`] (checked by the kernel tests and the self-check).
//! A packed matrix is as large as the file's: only int8 weights stay resident.
//!
//! # Layout
//!
//! For a weight `[n, k]` (rows = output channels) cut into blocks of [`LANES`] channels
//! (`blocks = ceil(n / 16)`, the last one padded with zero weights):
//!
//! - `data`: `[blocks][k / 4][16]` words; word `(b, q, l)` holds the four bytes
//!   `w[16b + l][4q .. 4q + 4]`, each stored as `w + 128` (unsigned, so `vpdpbusd` can take
//!   the weights as its unsigned operand and the activations, whose range is symmetric, as
//!   its signed one; the kernels subtract `128 · Σx` per group).
//! - `requant`: `[blocks][k / w_group][32]` words: the sixteen channels' multipliers `M`,
//!   then their exponents `E`, each in [`lane_slot`] order (even channels first, then odd
//!   ones, which is how 64-bit vector lanes take them), followed by a [`TRAILER`]-word
//!   summary of the range of every `(M, E)`, so that a kernel can tell in constant time
//!   whether its branch-free requantisation applies.

use super::{QMatrix, WeightLayout};

/// Output channels per packed block: one 512-bit vector of `i32` sums.
pub const LANES: usize = 16;
/// Words after the packed scales: `[min E, max E, 1 if every M >= 0 else 0]`.
pub const TRAILER: usize = 3;

/// Where channel `lane` of a block keeps its multiplier (and, 16 words on, its exponent):
/// even channels in slots 0..8, odd ones in 8..16.
pub const fn lane_slot(lane: usize) -> usize {
    (lane % 2) * (LANES / 2) + lane / 2
}

const _: () = assert!(LANES == 16 && lane_slot(0) == 0 && lane_slot(1) == 8 && lane_slot(15) == 15);

/// Shapes of a packed matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedShape {
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
}

impl PackedShape {
    pub fn blocks(&self) -> usize {
        self.rows.div_ceil(LANES)
    }
    pub fn quads(&self) -> usize {
        self.cols / 4
    }
    pub fn w_blocks(&self) -> usize {
        self.cols / self.group
    }
    pub fn data_words(&self) -> usize {
        self.blocks() * self.quads() * LANES
    }
    pub fn requant_words(&self) -> usize {
        self.blocks() * self.w_blocks() * 2 * LANES + TRAILER
    }
    /// Byte offset of `w[row][col]` in the packed data.
    pub fn byte_at(&self, row: usize, col: usize) -> usize {
        (((row / LANES) * self.quads() + col / 4) * LANES + row % LANES) * 4 + col % 4
    }
    /// Word offset of the multiplier of `row`'s block `w_block` (its exponent is 16 words on).
    pub fn mult_at(&self, row: usize, w_block: usize) -> usize {
        ((row / LANES) * self.w_blocks() + w_block) * 2 * LANES + lane_slot(row % LANES)
    }
}

/// The summary of every `(M, E)` of a packed matrix (its trailer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScaleRange {
    pub exp_min: i32,
    pub exp_max: i32,
    pub mults_non_negative: bool,
}

impl ScaleRange {
    pub fn read(requant: &[i32]) -> ScaleRange {
        let t = &requant[requant.len() - TRAILER..];
        ScaleRange {
            exp_min: t[0],
            exp_max: t[1],
            mults_non_negative: t[2] == 1,
        }
    }
}

/// Packs a `[rows, cols / 4]`-word int8 matrix (row-major, four values per word).
pub fn pack_data(words: &[i32], shape: PackedShape) -> Vec<i32> {
    assert_eq!(words.len(), shape.rows * shape.quads(), "pack_data: shape");
    let bytes: &[u8] = bytemuck::cast_slice(words);
    // Padding channels hold the value 0, stored as 0 + 128.
    let mut out = vec![0x8080_8080u32 as i32; shape.data_words()];
    let packed: &mut [u8] = bytemuck::cast_slice_mut(&mut out);
    for (row, src) in bytes.chunks_exact(shape.cols).enumerate() {
        for (col, &b) in src.iter().enumerate() {
            packed[shape.byte_at(row, col)] = b ^ 0x80;
        }
    }
    out
}

/// Packs `[rows, cols / group, 2]` words of `(M, E)` and appends the trailer.
pub fn pack_requant(requant: &[i32], shape: PackedShape) -> Vec<i32> {
    let wb = shape.w_blocks();
    assert_eq!(requant.len(), shape.rows * wb * 2, "pack_requant: shape");
    // Padding channels: M = 0 (their sums are 0 anyway) with an exponent inside every range.
    const PAD_EXP: i32 = 40;
    let mut out = vec![0i32; shape.requant_words()];
    for block in 0..shape.blocks() {
        for lane in LANES.min(shape.rows - (block * LANES).min(shape.rows))..LANES {
            for b in 0..wb {
                out[shape.mult_at(block * LANES + lane, b) + LANES] = PAD_EXP;
            }
        }
    }
    let (mut exp_min, mut exp_max, mut non_negative) = (PAD_EXP, PAD_EXP, true);
    for (row, pairs) in requant.chunks_exact(2 * wb).enumerate() {
        for (b, me) in pairs.chunks_exact(2).enumerate() {
            let at = shape.mult_at(row, b);
            out[at] = me[0];
            out[at + LANES] = me[1];
            exp_min = exp_min.min(me[1]);
            exp_max = exp_max.max(me[1]);
            non_negative &= me[0] >= 0;
        }
    }
    let n = out.len();
    out[n - TRAILER..].copy_from_slice(&[exp_min, exp_max, i32::from(non_negative)]);
    out
}

/// Row `row` of a packed matrix as signed bytes (an embedding lookup).
pub fn unpack_row(data: &[i32], shape: PackedShape, row: usize, out: &mut [i8]) {
    let bytes: &[u8] = bytemuck::cast_slice(data);
    for (col, o) in out.iter_mut().enumerate().take(shape.cols) {
        *o = (bytes[shape.byte_at(row, col)] ^ 0x80) as i8;
    }
}

/// `(M, E)` of `row`'s block `w_block` in a packed matrix.
pub fn requant_of(requant: &[i32], shape: PackedShape, row: usize, w_block: usize) -> (i32, i32) {
    let at = shape.mult_at(row, w_block);
    (requant[at], requant[at + LANES])
}

impl<T> QMatrix<T> {
    /// The packed shape, when this matrix is packed.
    pub fn packed_shape(&self) -> Option<PackedShape> {
        match self.layout {
            WeightLayout::Rows => None,
            WeightLayout::Packed => Some(PackedShape {
                rows: self.rows,
                cols: self.cols,
                group: self.group,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_moves_bytes_and_scales_without_changing_them() {
        for (rows, cols, group) in [(1, 4, 4), (17, 64, 32), (33, 96, 96), (16, 32, 8)] {
            let shape = PackedShape { rows, cols, group };
            let words: Vec<i32> = (0..rows * cols / 4)
                .map(|i| (i as u32).wrapping_mul(0x9E37_79B9) as i32)
                .collect();
            let data = pack_data(&words, shape);
            assert_eq!(data.len(), shape.data_words());
            let bytes: &[i8] = bytemuck::cast_slice(&words);
            let mut row = vec![0i8; cols];
            for r in 0..rows {
                unpack_row(&data, shape, r, &mut row);
                assert_eq!(row, bytes[r * cols..(r + 1) * cols], "row {r}");
            }
            let requant: Vec<i32> = (0..rows * cols / group)
                .flat_map(|i| [i as i32 * 7 + 1, 30 + (i % 5) as i32])
                .collect();
            let packed = pack_requant(&requant, shape);
            assert_eq!(packed.len(), shape.requant_words());
            for r in 0..rows {
                for b in 0..cols / group {
                    let i = r * (cols / group) + b;
                    assert_eq!(
                        requant_of(&packed, shape, r, b),
                        (requant[2 * i], requant[2 * i + 1])
                    );
                }
            }
            let range = ScaleRange::read(&packed);
            assert!(range.mults_non_negative);
            assert_eq!(range.exp_min, 30);
            assert_eq!(range.exp_max, 40); // the padding channels' exponent
        }
    }

    #[test]
    fn a_negative_multiplier_is_in_the_trailer() {
        let shape = PackedShape {
            rows: 16,
            cols: 4,
            group: 4,
        };
        let mut requant = vec![1 << 30; 32];
        requant[6] = -5;
        assert!(!ScaleRange::read(&pack_requant(&requant, shape)).mults_non_negative);
    }
}
