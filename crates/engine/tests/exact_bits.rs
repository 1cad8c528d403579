//! Exact precision: every integer op of the wgpu backend gives the same bits as the CPU
//! reference, with `dot4I8Packed` and with the portable int8 dot product. Needs a GPU adapter;
//! CI provides lavapipe. No adapter is a failure, not a skip.

use tabula_engine::{
    exact::selfcheck::compare_with_cpu,
    gpu::{AdapterChoice, GpuBackend},
};

fn gpu(packed: bool) -> GpuBackend {
    let mut g = pollster::block_on(GpuBackend::new(AdapterChoice::Any))
        .expect("a GPU adapter (install mesa-vulkan-drivers)");
    if !packed {
        g.use_portable_dot();
    }
    g
}

fn check(gpu: &GpuBackend) {
    let diffs = pollster::block_on(compare_with_cpu(gpu)).expect("the self-check runs");
    assert!(
        diffs.is_empty(),
        "exact ops differ from the CPU:\n{}",
        diffs.join("\n")
    );
}

#[test]
fn exact_ops_match_the_cpu_bit_for_bit_with_dot4i8packed() {
    let g = gpu(true);
    assert!(g.has_packed_dot(), "native wgpu always offers dot4I8Packed");
    check(&g);
}

#[test]
fn exact_ops_match_the_cpu_bit_for_bit_with_the_portable_dot() {
    check(&gpu(false));
}
