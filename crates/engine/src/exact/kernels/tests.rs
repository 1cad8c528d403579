//! Every supported kernel against the specification, written out directly (row-major, one
//! group at a time), on shapes and values chosen to reach every edge.

use super::*;
use crate::exact::{
    pack::{PackedShape, pack_data, pack_requant},
    quantize_group, split_scale,
};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Case {
    m: usize,
    n: usize,
    k: usize,
    group: usize,
    w_group: usize,
    x: Vec<i8>,
    scales: Vec<i32>,
    w: Vec<i8>,
    requant: Vec<i32>,
    bias: Option<Vec<i32>>,
}

impl Case {
    /// `extreme`: activations and weights at the ends of their ranges (±127, -128).
    fn new(
        rng: &mut Rng,
        (m, n, k): (usize, usize, usize),
        group: usize,
        w_group: usize,
        extreme: bool,
    ) -> Case {
        let mut x = vec![0i8; m * k];
        let mut scales = Vec::new();
        for row in x.chunks_exact_mut(group) {
            let fx: Vec<i32> = (0..group)
                .map(|_| {
                    if extreme {
                        if rng.below(2) == 0 {
                            i32::MAX
                        } else {
                            -i32::MAX
                        }
                    } else {
                        (rng.next() as i32) >> rng.below(31)
                    }
                })
                .collect();
            let s = quantize_group(&fx, row);
            scales.extend([s.reduced, s.shift]);
        }
        let w: Vec<i8> = (0..n * k)
            .map(|_| {
                if extreme {
                    [-128i8, 127, -127][rng.below(3) as usize]
                } else {
                    rng.next() as i8
                }
            })
            .collect();
        let mut requant = Vec::new();
        for _ in 0..n * (k / w_group) {
            let (mult, exp) = split_scale(1e-5 * (1.0 + rng.below(1000) as f64 / 100.0)).unwrap();
            requant.extend([mult, exp + rng.below(3) as i32]);
        }
        let bias = (rng.below(2) == 0).then(|| (0..n).map(|_| (rng.next() as i32) >> 8).collect());
        Case {
            m,
            n,
            k,
            group,
            w_group,
            x,
            scales,
            w,
            requant,
            bias,
        }
    }

    /// The specification: per output, per activation group, the int8 sum requantised with
    /// the general [`requantize`], added with wrapping.
    fn spec(&self) -> Vec<i32> {
        let groups = self.k / self.group;
        let wb = self.k / self.w_group;
        let mut out = vec![0i32; self.m * self.n];
        for r in 0..self.m {
            for c in 0..self.n {
                let mut y = self.bias.as_ref().map_or(0, |b| b[c]);
                for g in 0..groups {
                    let cols = g * self.group..(g + 1) * self.group;
                    let acc = cols.clone().fold(0i32, |a, i| {
                        a.wrapping_add(
                            i32::from(self.x[r * self.k + i]) * i32::from(self.w[c * self.k + i]),
                        )
                    });
                    let s = GroupScale {
                        reduced: self.scales[2 * (r * groups + g)],
                        shift: self.scales[2 * (r * groups + g) + 1],
                    };
                    let at = 2 * (c * wb + g * self.group / self.w_group);
                    y = y.wrapping_add(requantize(acc, s, self.requant[at], self.requant[at + 1]));
                }
                out[r * self.n + c] = y;
            }
        }
        out
    }

    fn run(&self, kernel: Kernel) -> Option<Vec<i32>> {
        let shape = PackedShape {
            rows: self.n,
            cols: self.k,
            group: self.w_group,
        };
        let words: &[i32] = bytemuck::cast_slice(&self.w);
        let data = pack_data(words, shape);
        let requant = pack_requant(&self.requant, shape);
        let x: Vec<i32> = self
            .x
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8]))
            .collect();
        let job = Job {
            x: &x,
            x_scales: &self.scales,
            w: bytemuck::cast_slice(&data),
            requant: &requant,
            bias: self.bias.as_deref(),
            shape,
            m: self.m,
            group: self.group,
        };
        let mut out = vec![0i32; self.m * self.n];
        with_kernel(kernel, || qlinear(&job, &mut out))?;
        Some(out)
    }
}

fn check(case: &Case, what: &str) {
    let want = case.spec();
    let kernels = Kernel::supported_all();
    assert!(kernels.contains(&Kernel::Scalar));
    for kernel in kernels {
        let got = case.run(kernel).expect("supported");
        if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
            panic!(
                "{what}: kernel {kernel} differs at output {i} (row {}, channel {}): {} != {}",
                i / case.n,
                i % case.n,
                got[i],
                want[i]
            );
        }
    }
}

#[test]
fn every_kernel_gives_the_bits_of_the_specification() {
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    // (m, n, k), activation group, weight group: tails of every tile and block size.
    let shapes = [
        ((1, 1, 32), 32, 32),
        ((1, 16, 64), 32, 64),
        ((5, 17, 96), 32, 96),
        ((9, 40, 128), 32, 32),
        ((4, 33, 64), 16, 32),
        ((3, 8, 48), 48, 48),
        ((7, 24, 384), 32, 384),
        ((2, 31, 12), 4, 12),
    ];
    for (dims, group, w_group) in shapes {
        for extreme in [false, true] {
            let case = Case::new(&mut rng, dims, group, w_group, extreme);
            check(
                &case,
                &format!("{dims:?} groups {group}/{w_group} extreme {extreme}"),
            );
        }
    }
}

#[test]
fn scales_outside_the_fast_range_take_the_general_form_on_every_kernel() {
    let mut rng = Rng(0x5EED_0000_0000_0002);
    let mut case = Case::new(&mut rng, (3, 20, 64), 32, 64, false);
    case.requant[2] = -case.requant[2]; // a negative multiplier
    check(&case, "negative multiplier");
    let mut case = Case::new(&mut rng, (3, 20, 64), 32, 64, false);
    case.requant[3] = 3; // a final shift below 1
    check(&case, "small exponent");
    let mut case = Case::new(&mut rng, (2, 20, 64), 32, 64, false);
    case.scales[1] = 20; // an activation shift quantize_group never makes
    check(&case, "large activation shift");
}

#[test]
fn the_best_kernel_is_supported_and_forcing_an_unsupported_one_is_refused() {
    assert!(Kernel::best().supported());
    for kernel in Kernel::ALL {
        assert_eq!(
            with_kernel(kernel, Kernel::active),
            kernel.supported().then_some(kernel)
        );
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512vnni") {
        assert_eq!(Kernel::best(), Kernel::Avx512Vnni);
    }
}

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
        let scale = crate::exact::GroupScale { reduced, shift };
        assert_eq!(
            requantize_in_range(acc, reduced as u32, shift, mult as u32, exp),
            requantize(acc, scale, mult, exp),
            "acc {acc} reduced {reduced} shift {shift} mult {mult} exp {exp}"
        );
    }
}

#[test]
fn the_self_check_of_the_cpu_kernels_passes_and_covers_every_supported_kernel() {
    let diffs = crate::exact::selfcheck::compare_cpu_kernels().expect("runs");
    assert!(diffs.is_empty(), "{diffs:?}");
}
