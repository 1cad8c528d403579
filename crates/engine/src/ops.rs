//! Scalar math shared by the CPU backend; the WGSL kernels in `gpu/*.wgsl` mirror these formulas
//! so both backends agree to a few ulps.

/// Error function, Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), which is well
/// under f32 rounding of the GELU inputs BERT produces.
pub fn erf(x: f32) -> f32 {
    let sign = if x < 0.0 { -1.0 } else { 1.0 };
    let x = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    sign * (1.0 - poly * (-x * x).exp())
}

pub(crate) fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

#[cfg(test)]
mod tests {
    #[test]
    fn erf_matches_known_values() {
        // erf values from tables (Abramowitz & Stegun Table 7.1).
        for (x, want) in [
            (0.0f32, 0.0f32),
            (0.5, 0.520_499_9),
            (1.0, 0.842_700_8),
            (2.0, 0.995_322_3),
            (-1.0, -0.842_700_8),
        ] {
            assert!(
                (super::erf(x) - want).abs() < 3e-7,
                "erf({x}) = {} want {want}",
                super::erf(x)
            );
        }
    }
}
