//! Shared helpers for the model tests: the real model files (fetched by `tabula models fetch`;
//! a missing file is a test failure with instructions, never a skip) and the fixtures computed
//! by the Python reference stack (`tests/fixtures/`).

#![allow(dead_code)]

use std::path::PathBuf;

use serde::Deserialize;
use tabula_engine::gpu::{AdapterChoice, GpuBackend};
use tabula_models::catalog;

pub fn model_file(local_path: &str) -> Vec<u8> {
    let path = catalog::default_models_dir().join(local_path);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!("cannot read {} ({e}); run `cargo run -p tabula-cli -- models fetch` (or set TABULA_MODELS)", path.display())
    })
}

pub fn fixtures_dir() -> PathBuf {
    // Cargo's variable at run time first: a test binary reused from a build in another
    // checkout (a shared target directory) still reads this checkout's fixtures.
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("../../tests/fixtures")
}

fn read_jsonl<T: for<'de> Deserialize<'de>>(name: &str) -> Vec<T> {
    let text = std::fs::read_to_string(fixtures_dir().join(name)).expect("fixture file");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("fixture line"))
        .collect()
}

#[derive(Deserialize)]
pub struct MiniLmFixture {
    pub text: String,
    pub input_ids: Vec<u32>,
    pub embedding: Vec<f32>,
}

pub fn minilm_fixtures() -> Vec<MiniLmFixture> {
    read_jsonl("minilm.jsonl")
}

#[derive(Deserialize)]
pub struct SmolFixture {
    pub prompt: String,
    pub chat: bool,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub first_step_top5_ids: Vec<u32>,
}

pub fn smollm2_fixtures() -> Vec<SmolFixture> {
    read_jsonl("smollm2.jsonl")
}

pub fn gpu() -> GpuBackend {
    pollster::block_on(GpuBackend::new(AdapterChoice::Any))
        .expect("a GPU adapter is required: install mesa-vulkan-drivers (lavapipe) for a software Vulkan device")
}

/// Runs the generator `tests/fixtures/{script} --out {out} {args}` (seeded: the same files on
/// every machine). Needs `python3` with `gguf` and `numpy`, or `$TABULA_PYLIB` holding them
/// (where `tests/run-all.sh` installs them).
pub fn generate(script: &str, out: &std::path::Path, args: &[&std::ffi::OsStr]) {
    let script = fixtures_dir().join(script);
    let mut python = std::process::Command::new("python3");
    python.arg(&script).arg("--out").arg(out).args(args);
    if let Some(lib) = std::env::var_os("TABULA_PYLIB") {
        python.env("PYTHONPATH", lib);
    }
    let done = python.output().expect("python3");
    assert!(
        done.status.success(),
        "{} failed (it needs the `gguf` and `numpy` packages: tests/run-all.sh installs them \
         into $TABULA_PYLIB):\n{}",
        script.display(),
        String::from_utf8_lossy(&done.stderr)
    );
}

/// Cosine similarity in f64.
pub fn cosine64(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

/// The same reference format as SmolLM2's (`tests/fixtures/make_gemma3.py`).
pub fn gemma3_fixtures() -> Vec<SmolFixture> {
    read_jsonl("gemma3.jsonl")
}

#[derive(Deserialize)]
pub struct TokensFixture {
    pub text: String,
    pub ids: Vec<u32>,
}

pub fn gemma3_token_fixtures() -> Vec<TokensFixture> {
    read_jsonl("gemma3-tokens.jsonl")
}

/// xorshift64*: deterministic mutations without extra crates.
pub fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed | 1;
    move || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        s.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}
