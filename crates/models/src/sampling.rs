//! Choosing the next token from logits: greedy, or temperature + nucleus (top-p) sampling driven
//! by a small seeded generator so `--seed S` reproduces a run.

/// SplitMix64: tiny, fast, and fully specified, so a seed means the same stream everywhere.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1) with 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// How to pick tokens.
#[derive(Clone, Debug)]
pub struct Sampler {
    pub temperature: f32,
    pub top_p: f32,
    rng: SplitMix64,
}

impl Sampler {
    /// `temperature <= 0` means greedy.
    pub fn new(temperature: f32, top_p: f32, seed: u64) -> Self {
        Self {
            temperature,
            top_p: top_p.clamp(0.0, 1.0),
            rng: SplitMix64::new(seed),
        }
    }

    pub fn greedy() -> Self {
        Self::new(0.0, 1.0, 0)
    }

    pub fn pick(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 || !self.temperature.is_finite() {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, (((l - max) / self.temperature) as f64).exp()))
            .collect();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let total: f64 = probs.iter().map(|p| p.1).sum();
        // Keep the smallest prefix whose mass reaches top_p.
        let mut kept = 0.0;
        let mut cut = probs.len();
        for (i, p) in probs.iter().enumerate() {
            kept += p.1 / total;
            if kept >= self.top_p as f64 {
                cut = i + 1;
                break;
            }
        }
        let probs = &probs[..cut];
        let mass: f64 = probs.iter().map(|p| p.1).sum();
        let mut r = self.rng.next_f64() * mass;
        for p in probs {
            if r < p.1 {
                return p.0;
            }
            r -= p.1;
        }
        probs.last().map_or(0, |p| p.0)
    }
}

/// The `counter`-th output of SplitMix64 seeded with `seed`, computed directly: a
/// counter-based generator, so draw `n` never depends on how many draws came before.
pub fn splitmix64_at(seed: u64, counter: u64) -> u64 {
    let mut z = seed.wrapping_add(counter.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Token choice for exact precision: integers only, so a seed gives the same tokens on every
/// backend and platform.
///
/// - Greedy: the first index of the largest logit.
/// - Otherwise, with logits `l` in Fx (`frac` bits), temperature `T` in thousandths and top-p
///   in Q16: weights `w = 2^(-(max - l) · log2(e) / T)` in Q15 through
///   [`tabula_engine::exact::exp2_neg_q15`]; tokens sorted by weight (then id); the shortest
///   prefix with `Σw · 2^16 >= top_p · Σ_all w` is kept; draw `n` is
///   `r = (splitmix64_at(seed, n) · Σ_kept w) >> 64` and picks the first token whose running sum
///   exceeds `r`.
#[derive(Clone, Debug)]
pub struct ExactSampler {
    /// Thousandths; 0 means greedy.
    pub temperature_milli: u32,
    /// Q16 (65536 = keep everything).
    pub top_p_q16: u32,
    pub seed: u64,
    draws: u64,
}

/// `round(log2(e) · 2^32)`.
const LOG2E_Q32: u128 = 6_196_328_019;

impl ExactSampler {
    /// From user-facing values: `temperature` and `top_p` are rounded to thousandths and Q16
    /// once, here, so every platform starts from the same integers.
    pub fn new(temperature: f32, top_p: f32, seed: u64) -> Self {
        let t = if temperature.is_finite() && temperature > 0.0 {
            (f64::from(temperature) * 1000.0).round().min(1e9) as u32
        } else {
            0
        };
        let p = (f64::from(top_p.clamp(0.0, 1.0)) * 65536.0).round() as u32;
        Self {
            temperature_milli: t,
            top_p_q16: p,
            seed,
            draws: 0,
        }
    }

    pub fn greedy() -> Self {
        Self::new(0.0, 1.0, 0)
    }

    /// From the integers themselves (as a work unit carries them); `top_p_q16` is capped at
    /// 65536.
    pub fn from_parts(temperature_milli: u32, top_p_q16: u32, seed: u64) -> Self {
        Self {
            temperature_milli,
            top_p_q16: top_p_q16.min(65536),
            seed,
            draws: 0,
        }
    }

    /// The same sampler after `picks` tokens were picked: a rebuilt pipeline's last stage
    /// joins a generation at that step and must make the draws the lost one would have made.
    pub fn after_picks(mut self, picks: u64) -> Self {
        if self.temperature_milli != 0 {
            self.draws = picks;
        }
        self
    }

    pub fn pick(&mut self, logits: &[i32], frac: u32) -> u32 {
        let Some(&max) = logits.iter().max() else {
            return 0;
        };
        if self.temperature_milli == 0 {
            return logits.iter().position(|&l| l == max).unwrap_or(0) as u32;
        }
        // Score units: 2^-16 of log2, from Fx logits scaled by 1000 / T.
        let denom = u128::from(self.temperature_milli) << (32 + frac);
        let mut weights: Vec<(u32, u64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                let d = u128::from((max as u32).wrapping_sub(l as u32));
                let score = ((d * LOG2E_Q32 * 1000) << 16) / denom;
                let w = tabula_engine::exact::exp2_neg_q15(score.min(u32::MAX as u128) as u32);
                (i as u32, u64::from(w))
            })
            .filter(|&(_, w)| w > 0)
            .collect();
        weights.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let total: u64 = weights.iter().map(|w| w.1).sum();
        let need = u128::from(self.top_p_q16) * u128::from(total);
        let mut kept = 0u64;
        let mut cut = weights.len();
        for (i, w) in weights.iter().enumerate() {
            kept += w.1;
            if u128::from(kept) << 16 >= need {
                cut = i + 1;
                break;
            }
        }
        let weights = &weights[..cut.max(1)];
        let mass: u64 = weights.iter().map(|w| w.1).sum();
        let draw = splitmix64_at(self.seed, self.draws);
        self.draws += 1;
        let r = ((u128::from(draw) * u128::from(mass)) >> 64) as u64;
        let mut run = 0u64;
        for w in weights {
            run += w.1;
            if run > r {
                return w.0;
            }
        }
        weights.last().map_or(0, |w| w.0)
    }
}

/// Index of the largest value; the first one on ties.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_based_draws_match_the_stream() {
        let mut s = SplitMix64::new(42);
        for n in 0..10 {
            assert_eq!(splitmix64_at(42, n), s.next_u64());
        }
    }

    #[test]
    fn exact_sampling_is_seeded_greedy_at_zero_and_cut_by_top_p() {
        let logits: Vec<i32> = (0..50).map(|i| (i % 7) << 12).collect();
        assert_eq!(ExactSampler::greedy().pick(&logits, 12), 6);
        let run = |seed| {
            let mut s = ExactSampler::new(0.8, 0.9, seed);
            (0..30).map(|_| s.pick(&logits, 12)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let distinct: std::collections::BTreeSet<_> = run(3).into_iter().map(|t| t % 7).collect();
        assert!(distinct.len() > 1, "temperature 0.8 should not be greedy");
        let mut s = ExactSampler::new(1.0, 0.01, 1);
        for _ in 0..50 {
            assert_eq!(logits[s.pick(&logits, 12) as usize], 6 << 12);
        }
    }

    #[test]
    fn greedy_takes_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(Sampler::greedy().pick(&[0.0, 0.5, 0.1]), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_top_p_cuts_the_tail() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32).collect();
        let run = |seed| {
            let mut s = Sampler::new(0.8, 0.9, seed);
            (0..20).map(|_| s.pick(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        // With a tiny top_p only the best tokens (value 6) can come out.
        let mut s = Sampler::new(1.0, 0.01, 1);
        for _ in 0..50 {
            assert_eq!(logits[s.pick(&logits) as usize], 6.0);
        }
    }
}
