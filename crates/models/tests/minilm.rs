//! all-MiniLM-L6-v2 against the reference embeddings, on both backends, plus layer shards.

mod common;

use common::*;
use tabula_engine::{Backend, cpu::CpuBackend};
use tabula_models::{Activations, activations::Hidden, bert::SentenceEmbedder, catalog::MINILM};

fn embedder<B: Backend>(backend: &B) -> SentenceEmbedder<B> {
    let file = |i: usize| model_file(MINILM.files[i].local_path);
    SentenceEmbedder::load(backend, &file(1), &file(0), &file(2)).expect("load MiniLM")
}

fn check_fixtures<B: Backend>(backend: &B) {
    let model = embedder(backend);
    let fixtures = minilm_fixtures();
    let texts: Vec<&str> = fixtures.iter().map(|f| f.text.as_str()).collect();
    let got = pollster::block_on(model.embed(backend, &texts)).unwrap();
    let mut worst = 1.0f32;
    for (f, e) in fixtures.iter().zip(&got) {
        assert_eq!(e.input_ids, f.input_ids, "token ids of {:?}", f.text);
        let cos = cosine(&e.vector, &f.embedding);
        worst = worst.min(cos);
        assert!(
            cos >= 0.9999,
            "cosine {cos} for {:?} on {}",
            f.text,
            backend.describe()
        );
    }
    eprintln!(
        "{}: {} texts, worst cosine {worst}",
        backend.describe(),
        fixtures.len()
    );
}

#[test]
fn cpu_matches_reference_embeddings() {
    check_fixtures(&CpuBackend);
}

#[test]
fn gpu_matches_reference_embeddings() {
    check_fixtures(&gpu());
}

/// Running layers [0, k) and then [k, n) — through the byte format, with separately loaded
/// shards — gives exactly the bits of [0, n).
fn check_shards<B: Backend>(backend: &B) {
    let full = embedder(backend);
    let n = full.model.config.num_hidden_layers;
    let ids = full
        .tokenize(&[
            "Layer shards must agree.",
            "A second, rather longer sentence to force padding in the batch.",
        ])
        .unwrap();
    let whole = pollster::block_on(
        full.model
            .run_layers(backend, full.model.embed_tokens(backend, &ids).unwrap())
            .unwrap()
            .to_activations(backend),
    )
    .unwrap();
    let weights = model_file(MINILM.files[0].local_path);
    for k in [1, 3, 5] {
        let config = full.model.config.clone();
        let first =
            tabula_models::bert::BertModel::load_layers(backend, &weights, config.clone(), 0..k)
                .unwrap();
        let second =
            tabula_models::bert::BertModel::load_layers(backend, &weights, config, k..n).unwrap();
        let mid = first
            .run_layers(backend, first.embed_tokens(backend, &ids).unwrap())
            .unwrap();
        let bytes = pollster::block_on(mid.to_activations(backend))
            .unwrap()
            .to_bytes();
        let mid =
            Hidden::from_activations(backend, &Activations::from_bytes(&bytes).unwrap()).unwrap();
        assert!(
            first.run_layers(backend, mid.clone()).is_err(),
            "a shard must refuse activations at another layer"
        );
        let out = pollster::block_on(
            second
                .run_layers(backend, mid)
                .unwrap()
                .to_activations(backend),
        )
        .unwrap();
        assert_eq!(
            out,
            whole,
            "[0,{k}) + [{k},{n}) differs from [0,{n}) on {}",
            backend.describe()
        );
    }
}

#[test]
fn cpu_layer_shards_compose_exactly() {
    check_shards(&CpuBackend);
}

#[test]
fn gpu_layer_shards_compose_exactly() {
    check_shards(&gpu());
}
