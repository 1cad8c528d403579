//! Exact precision with the real models: fidelity against the fp32 reference fixtures, and the
//! same bits on the CPU backend and wgpu (lavapipe in CI). Browser and wasm backends are
//! checked against the same hashes by `tests/browser/exact.test.mjs`.

mod common;

use common::*;
use tabula_engine::{cpu::CpuBackend, exact::ExactBackend};
use tabula_models::{
    catalog::{MINILM, SMOLLM2},
    exact::{
        ExactEmbedder, ExactEmbedding, ExactFile, ExactGenerator, ExactLlama, ExactStep,
        quantize_bert, quantize_llama,
    },
    gguf::GgufFile,
    sampling::ExactSampler,
    tokenize::LlamaTokenizer,
};

fn minilm_exact() -> (Vec<u8>, String) {
    let file = |i: usize| model_file(MINILM.files[i].local_path);
    quantize_bert(MINILM.name, &file(1), &file(0)).expect("quantise MiniLM")
}

fn embed_all<B: ExactBackend>(backend: &B, bytes: &[u8], hash: &str) -> Vec<ExactEmbedding> {
    let file = ExactFile::open(bytes, hash).unwrap();
    let tokenizer = model_file(MINILM.files[2].local_path);
    let embedder = ExactEmbedder::load(backend, &file, &tokenizer).unwrap();
    let texts: Vec<String> = minilm_fixtures().into_iter().map(|f| f.text).collect();
    pollster::block_on(embedder.embed(backend, &texts)).unwrap()
}

#[test]
fn minilm_exact_is_faithful_and_bit_identical_on_cpu_and_gpu() {
    let (bytes, hash) = minilm_exact();
    let again = minilm_exact();
    assert_eq!(hash, again.1, "quantising twice must give the same file");
    let fixtures = minilm_fixtures();
    let cpu = embed_all(&CpuBackend, &bytes, &hash);
    let mut cosines = Vec::new();
    for (f, e) in fixtures.iter().zip(&cpu) {
        assert_eq!(e.input_ids, f.input_ids, "token ids of {:?}", f.text);
        cosines.push(cosine(&e.to_f32(), &f.embedding));
    }
    let mean = cosines.iter().sum::<f32>() / cosines.len() as f32;
    let min = cosines.iter().copied().fold(1.0, f32::min);
    eprintln!("MiniLM exact vs fp32: mean cosine {mean:.6}, min {min:.6}");
    assert!(mean >= 0.99 && min >= 0.97, "mean {mean} min {min}");

    let gpu = embed_all(&gpu(), &bytes, &hash);
    for ((f, c), g) in fixtures.iter().zip(&cpu).zip(&gpu) {
        assert_eq!(
            c.sha256, g.sha256,
            "exact embedding of {:?} differs between CPU and GPU",
            f.text
        );
        assert_eq!(c.q15, g.q15);
    }
}

fn smol_generator<B: ExactBackend>(backend: &B, bytes: &[u8], hash: &str) -> ExactGenerator<B> {
    let file = ExactFile::open(bytes, hash).unwrap();
    let gguf_bytes = model_file(SMOLLM2.files[0].local_path);
    let tokenizer = LlamaTokenizer::from_gguf(&GgufFile::parse(&gguf_bytes).unwrap()).unwrap();
    ExactGenerator::new(ExactLlama::load(backend, &file).unwrap(), tokenizer).unwrap()
}

fn greedy_all<B: ExactBackend>(
    backend: &B,
    bytes: &[u8],
    hash: &str,
    tokens: usize,
) -> Vec<Vec<ExactStep>> {
    let generator = smol_generator(backend, bytes, hash);
    smollm2_fixtures()
        .iter()
        .map(|f| {
            let mut s = ExactSampler::greedy();
            pollster::block_on(generator.generate(backend, &f.prompt_ids, tokens, &mut s, |_| {}))
                .unwrap()
                .0
        })
        .collect()
}

#[test]
fn smollm2_exact_is_faithful_and_bit_identical_on_cpu_and_gpu() {
    let gguf_bytes = model_file(SMOLLM2.files[0].local_path);
    let (bytes, hash) = quantize_llama(SMOLLM2.name, &gguf_bytes).expect("quantise SmolLM2");
    let cpu = greedy_all(&CpuBackend, &bytes, &hash, 8);
    let mut matching = 0;
    for (f, steps) in smollm2_fixtures().iter().zip(&cpu) {
        let ids: Vec<u32> = steps.iter().map(|s| s.token).collect();
        let want = &f.greedy_ids[..ids.len().min(f.greedy_ids.len())];
        eprintln!("{:?}: exact {ids:?} fp32 {want:?}", f.prompt);
        if ids.len() >= 8.min(f.greedy_ids.len())
            && ids[..8.min(ids.len())] == f.greedy_ids[..8.min(ids.len())]
        {
            matching += 1;
        }
    }
    eprintln!("SmolLM2 exact: first 8 greedy tokens match fp32 on {matching} of 6 prompts");
    assert!(matching >= 4, "only {matching} prompts match");

    let gpu = greedy_all(&gpu(), &bytes, &hash, 8);
    assert_eq!(
        cpu, gpu,
        "exact logits or tokens differ between CPU and GPU"
    );
}
