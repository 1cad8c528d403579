//! Times each op of both backends on BERT-sized inputs: `cargo run --release -p tabula-engine
//! --example opbench`. A tool for kernel work, not a benchmark of record (see `tabula bench`).

use std::time::Instant;

use tabula_engine::{
    AttentionParams, Backend,
    cpu::CpuBackend,
    gpu::{AdapterChoice, GpuBackend},
};

fn time<B: Backend>(backend: &B, name: &str, f: impl Fn() -> B::Tensor) {
    let warm = f();
    pollster::block_on(backend.read(&warm)).unwrap();
    let start = Instant::now();
    let reps = 3;
    let mut last = None;
    for _ in 0..reps {
        last = Some(f());
    }
    pollster::block_on(backend.read(&last.unwrap())).unwrap();
    println!(
        "{:28} {:>10.2} ms  {}",
        name,
        start.elapsed().as_secs_f64() * 1000.0 / reps as f64,
        backend.describe()
    );
}

fn run<B: Backend>(b: &B) {
    let (rows, h, ffn) = (32 * 24, 384, 1536);
    let x = b.upload(&vec![0.01; rows * h], &[rows, h]).unwrap();
    let w = b.upload(&vec![0.02; ffn * h], &[ffn, h]).unwrap();
    let bias = b.upload(&vec![0.0; ffn], &[ffn]).unwrap();
    time(b, "linear 768x384 -> 1536", || {
        b.linear(&x, &w, Some(&bias)).unwrap()
    });
    let x1 = b.slice_rows(&x, 0, 1).unwrap();
    time(b, "linear 1x384 -> 1536", || {
        b.linear(&x1, &w, Some(&bias)).unwrap()
    });
    let p = AttentionParams {
        batch: 32,
        q_len: 24,
        kv_rows: 24,
        heads: 12,
        kv_heads: 12,
        head_dim: 32,
        causal: false,
        pos_offset: 0,
        window: None,
    };
    time(b, "attention 32x24, 12 heads", || {
        b.attention(&x, &x, &x, &[24; 32], &p).unwrap()
    });
    let g = b.upload(&vec![1.0; h], &[h]).unwrap();
    time(b, "layer_norm 768x384", || {
        b.layer_norm(&x, &g, &g, 1e-12).unwrap()
    });
    let y = b.linear(&x, &w, None).unwrap();
    time(b, "gelu 768x1536", || b.gelu(&y).unwrap());
}

fn main() {
    run(&CpuBackend);
    run(&pollster::block_on(GpuBackend::new(AdapterChoice::Any)).unwrap());
}
