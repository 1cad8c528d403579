//! SmolLM2-135M-Instruct (GGUF Q4_1) against the reference greedy continuations, on both
//! backends, plus layer shards.

mod common;

use common::*;
use tabula_engine::{Backend, cpu::CpuBackend};
use tabula_models::{
    Activations,
    activations::Hidden,
    catalog::SMOLLM2,
    gguf::GgufFile,
    llama::{Generator, LlamaModel},
    sampling::Sampler,
};

fn check_greedy<B: Backend>(backend: &B) {
    let bytes = model_file(SMOLLM2.files[0].local_path);
    let generator = Generator::load(backend, &bytes).expect("load SmolLM2");
    for f in smollm2_fixtures() {
        let ids = generator.prompt_ids(&f.prompt, f.chat).unwrap();
        assert_eq!(ids, f.prompt_ids, "prompt ids of {:?}", f.prompt);
        let (out, _) = pollster::block_on(generator.generate(
            backend,
            &ids,
            f.greedy_ids.len(),
            &mut Sampler::greedy(),
            |_| {},
        ))
        .unwrap();
        assert_eq!(
            out,
            f.greedy_ids,
            "greedy continuation of {:?} on {}",
            f.prompt,
            backend.describe()
        );
    }
}

#[test]
fn cpu_reproduces_reference_greedy_tokens() {
    check_greedy(&CpuBackend);
}

#[test]
fn gpu_reproduces_reference_greedy_tokens() {
    check_greedy(&gpu());
}

fn check_shards<B: Backend>(backend: &B) {
    let bytes = model_file(SMOLLM2.files[0].local_path);
    let gguf = GgufFile::parse(&bytes).unwrap();
    let full = LlamaModel::load(backend, &gguf, &bytes).unwrap();
    let n = full.config.layers;
    let prompt = smollm2_fixtures()[0].prompt_ids.clone();
    let mut cache = full.new_cache(backend, 16).unwrap();
    let whole = full
        .run_layers(
            backend,
            full.embed_tokens(backend, &prompt, 0).unwrap(),
            &mut cache,
        )
        .unwrap();
    let whole_logits =
        pollster::block_on(backend.read(&full.head(backend, &whole).unwrap())).unwrap();
    let k = n / 2;
    let first = LlamaModel::load_layers(backend, &gguf, &bytes, 0..k).unwrap();
    let second = LlamaModel::load_layers(backend, &gguf, &bytes, k..n).unwrap();
    let (mut c1, mut c2) = (
        first.new_cache(backend, 16).unwrap(),
        second.new_cache(backend, 16).unwrap(),
    );
    let mid = first
        .run_layers(
            backend,
            first.embed_tokens(backend, &prompt, 0).unwrap(),
            &mut c1,
        )
        .unwrap();
    let wire = pollster::block_on(mid.to_activations(backend))
        .unwrap()
        .to_bytes();
    let mid = Hidden::from_activations(backend, &Activations::from_bytes(&wire).unwrap()).unwrap();
    let out = second.run_layers(backend, mid, &mut c2).unwrap();
    assert_eq!(
        pollster::block_on(out.to_activations(backend)).unwrap(),
        pollster::block_on(whole.to_activations(backend)).unwrap(),
        "[0,{k}) + [{k},{n}) hidden states differ on {}",
        backend.describe()
    );
    let logits = pollster::block_on(backend.read(&second.head(backend, &out).unwrap())).unwrap();
    assert_eq!(logits, whole_logits);
    let embedded = first.embed_tokens(backend, &prompt, 0).unwrap();
    assert!(
        first.head(backend, &embedded).is_err(),
        "the first shard has no head"
    );
}

#[test]
fn cpu_layer_shards_compose_exactly() {
    check_shards(&CpuBackend);
}

#[test]
fn gpu_layer_shards_compose_exactly() {
    check_shards(&gpu());
}
