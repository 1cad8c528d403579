//! BERT directories of any shape, made at test time (`tests/fixtures/make_bert_dirs.py`,
//! seeded numpy: the same files on every machine), against the sentence embeddings
//! transformers computed from the same directories (`tests/fixtures/bert-random.json`): CLS
//! pooling with normalisation and `bert.`-prefixed F32 tensors; max pooling without
//! normalisation, F16 tensors and no token-type embeddings; a plain Hugging Face directory
//! (mean pooling, not normalised) 96 wide in heads of 32. Each is read as `tabula models add`
//! reads it (`sentence_modules`, `registered_config`, `inspect`), then run in fast precision
//! on the CPU and wgpu, and in exact precision, with the same bits on both. Needs `python3`
//! with `numpy` (or `$TABULA_PYLIB`, where `tests/run-all.sh` installs it).

mod common;

use common::*;
use tabula_engine::{Backend, cpu::CpuBackend, exact::ExactBackend};
use tabula_models::{
    bert::{self, BertConfig, BertModel},
    exact::{ExactBert, ExactFile, quantize_bert},
    tokenize::BertTokenizer,
};

/// One directory as registered: its config (with the modules' settings), weights, tokenizer,
/// and transformers' reference.
struct Variant {
    name: String,
    config_json: Vec<u8>,
    config: BertConfig,
    weights: Vec<u8>,
    tokenizer: BertTokenizer,
    ids: Vec<Vec<u32>>,
    texts: Vec<String>,
    reference: Vec<Vec<f64>>,
}

fn variants() -> Vec<Variant> {
    let dir = tempfile::tempdir().unwrap();
    generate("make_bert_dirs.py", dir.path(), &[]);
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures_dir().join("bert-random.json")).unwrap(),
    )
    .unwrap();
    let out: Vec<Variant> = reference
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, r)| {
            let d = dir.path().join(name);
            let read = |file: &str| std::fs::read(d.join(file)).unwrap();
            let weights = read("model.safetensors");
            assert_eq!(
                tabula_models::catalog::sha256_hex(&weights),
                r["safetensors_sha256"].as_str().unwrap(),
                "{name}: the generator made another file than the reference was computed from \
                 (another numpy?); rerun it with --reference"
            );
            let modules =
                bert::sentence_modules(&|file: &str| Ok(std::fs::read(d.join(file)).ok()))
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            let (config_json, config) =
                bert::registered_config(&read("config.json"), &modules, &weights)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            let summary =
                bert::inspect(&config, &weights).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(summary.layers, config.num_hidden_layers);
            let tokenizer =
                BertTokenizer::from_json(&read("tokenizer.json"), config.max_tokens()).unwrap();
            let list =
                |v: &serde_json::Value| -> Vec<serde_json::Value> { v.as_array().unwrap().clone() };
            Variant {
                name: name.clone(),
                config_json,
                config,
                weights,
                tokenizer,
                ids: list(&r["ids"])
                    .iter()
                    .map(|s| list(s).iter().map(|x| x.as_u64().unwrap() as u32).collect())
                    .collect(),
                texts: list(&r["texts"])
                    .iter()
                    .map(|t| t.as_str().unwrap().to_string())
                    .collect(),
                reference: list(&r["embeddings"])
                    .iter()
                    .map(|s| list(s).iter().map(|x| x.as_f64().unwrap()).collect())
                    .collect(),
            }
        })
        .collect();
    assert_eq!(out.len(), 3);
    out
}

fn norm(a: &[f64]) -> f64 {
    a.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// The directories' settings are read as their modules say, and the tokenizer gives
/// transformers' ids (truncated at `bert-cls`' `max_seq_length` of 24).
#[test]
fn random_bert_directories_are_read_as_their_modules_say() {
    for v in variants() {
        let c = &v.config;
        let expected = match v.name.as_str() {
            "bert-cls" => (bert::Pooling::Cls, true, 2, 24),
            "bert-max" => (bert::Pooling::Max, false, 0, 64),
            "bert-mean" => (bert::Pooling::Mean, false, 2, 64),
            other => panic!("unknown variant {other}"),
        };
        assert_eq!(
            (c.pooling, c.normalize, c.type_vocab_size, c.max_tokens()),
            expected,
            "{}",
            v.name
        );
        // The registered config parses back to the same settings (what a worker reads).
        assert_eq!(&BertConfig::from_json(&v.config_json).unwrap(), c);
        for (text, want) in v.texts.iter().zip(&v.ids) {
            assert_eq!(
                &v.tokenizer.encode(text).unwrap(),
                want,
                "{}: {text}",
                v.name
            );
        }
    }
}

fn check_fast<B: Backend>(backend: &B) {
    for v in variants() {
        let model = BertModel::load(backend, &v.weights, v.config.clone()).unwrap();
        // In one batch (padded) and one text at a time: the same vectors.
        let batched = pollster::block_on(model.embed_ids(backend, &v.ids, 8)).unwrap();
        let single = pollster::block_on(model.embed_ids(backend, &v.ids, 1)).unwrap();
        for (i, ((got, alone), want)) in batched.iter().zip(&single).zip(&v.reference).enumerate() {
            let got: Vec<f64> = got.iter().map(|&x| f64::from(x)).collect();
            let alone: Vec<f64> = alone.iter().map(|&x| f64::from(x)).collect();
            let err = got
                .iter()
                .zip(want)
                .map(|(g, w)| (g - w).abs())
                .fold(0f64, f64::max)
                / norm(want);
            assert!(
                err < 1e-5 && cosine64(&got, &alone) > 0.999_999,
                "{} text {i} on {}: relative error {err:.2e}",
                v.name,
                backend.describe()
            );
        }
    }
}

#[test]
fn random_bert_directories_match_transformers_on_the_cpu() {
    check_fast(&CpuBackend);
}

#[test]
fn random_bert_directories_match_transformers_on_wgpu() {
    check_fast(&gpu());
}

fn exact_vectors<B: ExactBackend>(
    backend: &B,
    file: &ExactFile<'_>,
    ids: &[Vec<u32>],
) -> Vec<(Vec<i32>, String)> {
    let model = ExactBert::load(backend, file).unwrap();
    pollster::block_on(model.embed_ids(backend, ids, 8))
        .unwrap()
        .into_iter()
        .map(|e| (e.q15, e.sha256))
        .collect()
}

/// Exact precision on the same directories: the CPU and wgpu give the same integers, and
/// they stay near transformers' f32 vectors. Measured (2026-12-07): cosine 0.99977–0.99997,
/// length within 0.2 % where not normalised; the thresholds: cosine ≥ 0.998, length within 2 %.
#[test]
fn random_bert_directories_in_exact_precision_are_bit_identical_and_faithful() {
    let gpu = gpu();
    for v in variants() {
        let name = &v.name;
        let (bytes, hash) = quantize_bert(name, &v.config_json, &v.weights)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let file = ExactFile::open(&bytes, &hash).unwrap();
        let cpu = exact_vectors(&CpuBackend, &file, &v.ids);
        assert_eq!(
            cpu,
            exact_vectors(&gpu, &file, &v.ids),
            "{name}: exact vectors differ between the CPU and wgpu"
        );
        for (i, ((q15, _), want)) in cpu.iter().zip(&v.reference).enumerate() {
            let got: Vec<f64> = q15.iter().map(|&x| f64::from(x) / 32768.0).collect();
            let (c, ratio) = (cosine64(&got, want), norm(&got) / norm(want));
            eprintln!("{name} text {i}: cosine {c:.5}, length ratio {ratio:.4}");
            assert!(c >= 0.998, "{name} text {i}: cosine {c:.5}");
            assert!(
                (ratio - 1.0).abs() < 0.02,
                "{name} text {i}: length ratio {ratio:.4}"
            );
        }
    }
}
