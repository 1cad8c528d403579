//! Llama-family GGUFs beyond SmolLM2, made at test time with the `gguf` package
//! (`tests/fixtures/make_llama_family.py`, seeded: the same files on every machine), against
//! the logits transformers computed from the same files (`tests/fixtures/llama-family.json`):
//! Qwen2 with Q/K/V biases, its own rotary layout, 4 query heads on 1 KV head, an untied head
//! and Q4_K/Q5_K/Q6_K weights; Llama with no grouping, a tied head, F16 and Q5_0 weights;
//! Llama with RoPE scaled linearly by 4, by YaRN (factor 4), and with Llama 3.1's
//! per-frequency factors. On
//! the CPU and on wgpu; and in exact precision, the same bits on both, near the reference. Needs `python3` with `gguf` and `numpy` (or `$TABULA_PYLIB`, where
//! `tests/run-all.sh` installs them).

mod common;

use common::*;
use tabula_engine::{Backend, cpu::CpuBackend, exact::ExactBackend};
use tabula_models::{
    exact::{ExactFile, ExactLlama, StageInput, StageOutput, quantize_llama},
    gguf::GgufFile,
    llama::LlamaModel,
};

/// One variant: its GGUF (made at test time) and transformers' logits at positions 11 (end of
/// a 12-token prefill) and 12 (one step through the cache).
struct Variant {
    name: String,
    gguf: Vec<u8>,
    ids: Vec<u32>,
    logits: [Vec<f64>; 2],
}

/// The variants of `llama-family.json`, their files made now and checked to be the ones the
/// reference was computed from.
fn variants() -> Vec<Variant> {
    let dir = tempfile::tempdir().unwrap();
    generate("make_llama_family.py", dir.path(), &[]);
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures_dir().join("llama-family.json")).unwrap(),
    )
    .unwrap();
    let numbers = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let variants: Vec<Variant> = reference
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, r)| {
            let gguf = std::fs::read(dir.path().join(format!("{name}.gguf"))).unwrap();
            assert_eq!(
                tabula_models::catalog::sha256_hex(&gguf),
                r["gguf_sha256"].as_str().unwrap(),
                "{name}: the generator made another file than the reference was computed from \
                 (another numpy or gguf?); rerun it with --reference"
            );
            Variant {
                name: name.clone(),
                gguf,
                ids: numbers(&r["ids"]).into_iter().map(|x| x as u32).collect(),
                logits: [numbers(&r["logits_11"]), numbers(&r["logits_12"])],
            }
        })
        .collect();
    assert_eq!(variants.len(), 5);
    variants
}

/// Largest difference over the largest reference magnitude.
fn relative_error(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, w| m.max(w.abs())).max(1e-6);
    got.iter()
        .zip(want)
        .map(|(g, w)| (f64::from(*g) - w).abs())
        .fold(0f64, f64::max)
        / scale
}

fn check<B: Backend>(backend: &B) {
    for v in variants() {
        let name = &v.name;
        let gguf = GgufFile::parse(&v.gguf).unwrap();
        let model = LlamaModel::load(backend, &gguf, &v.gguf)
            .unwrap_or_else(|e| panic!("{name} does not load: {e}"));
        // Prefill of 12 tokens, then one token through the KV cache.
        let mut cache = model.new_cache(backend, v.ids.len()).unwrap();
        for ((input, pos), want) in [(&v.ids[..12], 0), (&v.ids[12..], 12)]
            .into_iter()
            .zip(&v.logits)
        {
            let h = model.embed_tokens(backend, input, pos).unwrap();
            let h = model.run_layers(backend, h, &mut cache).unwrap();
            let got = pollster::block_on(backend.read(&model.head(backend, &h).unwrap())).unwrap();
            let err = relative_error(&got, want);
            // f32 on both sides; transformers sums in another order.
            assert!(
                err < 1e-4,
                "{name} at position {} on {}: relative error {err:.2e}",
                pos + input.len() - 1,
                backend.describe()
            );
        }
    }
}

#[test]
fn random_llama_family_ggufs_match_transformers_on_the_cpu() {
    check(&CpuBackend);
}

#[test]
fn random_llama_family_ggufs_match_transformers_on_wgpu() {
    check(&gpu());
}

/// Exact-precision logits (integers at the model's fraction bits) of the 12-token prefill and
/// one step through the cache.
fn exact_logits<B: ExactBackend>(
    backend: &B,
    file: &ExactFile<'_>,
    ids: &[u32],
) -> (u32, Vec<Vec<i32>>) {
    let model = ExactLlama::load(backend, file).unwrap();
    let mut cache = model.new_cache(backend, ids.len()).unwrap();
    let mut out = Vec::new();
    for (input, pos) in [(&ids[..12], 0), (&ids[12..], 12)] {
        match pollster::block_on(model.step_stage(
            backend,
            StageInput::Tokens(input),
            pos,
            &mut cache,
        ))
        .unwrap()
        {
            StageOutput::Logits(l) => out.push(l),
            StageOutput::Hidden(_) => panic!("a whole model ends in logits"),
        }
    }
    (model.frac, out)
}

/// Exact precision on the same random files: the CPU and wgpu give the same integers, and
/// they stay near transformers' f32 logits. Measured (2026-12-07): cosine 0.99978–0.99996 and
/// the same top token at every checked position; the thresholds: cosine ≥ 0.999, same top token.
#[test]
fn random_llama_family_ggufs_in_exact_precision_are_bit_identical_and_faithful() {
    let gpu = gpu();
    for v in variants() {
        let name = &v.name;
        let (bytes, hash) = quantize_llama(name, &v.gguf).unwrap_or_else(|e| panic!("{name}: {e}"));
        let file = ExactFile::open(&bytes, &hash).unwrap();
        let (frac, cpu) = exact_logits(&CpuBackend, &file, &v.ids);
        let (_, on_gpu) = exact_logits(&gpu, &file, &v.ids);
        assert_eq!(
            cpu, on_gpu,
            "{name}: exact logits differ between the CPU and wgpu"
        );
        for (position, (got, want)) in [11, 12].into_iter().zip(cpu.iter().zip(&v.logits)) {
            let got: Vec<f64> = got
                .iter()
                .map(|&x| f64::from(x) / f64::from(1u32 << frac))
                .collect();
            let argmax = |x: &[f64]| (0..x.len()).max_by(|&a, &b| x[a].total_cmp(&x[b])).unwrap();
            let c = cosine64(&got, want);
            eprintln!(
                "{name} at {position}: cosine {c:.5}, top {} vs {}",
                argmax(&got),
                argmax(want)
            );
            assert!(
                c >= 0.999,
                "{name} at {position}: cosine {c:.5} with transformers' logits"
            );
            assert_eq!(
                argmax(&got),
                argmax(want),
                "{name} at {position}: another top token"
            );
        }
    }
}
