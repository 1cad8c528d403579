//! Hostile model files: truncated or corrupted safetensors and GGUF inputs must give precise
//! errors from the loaders, never a panic. (The GGUF parser has its own mutation tests in
//! `gguf.rs`; these go through the full model loaders with the real files.)

mod common;

use common::{model_file, rng};
use tabula_engine::cpu::CpuBackend;
use tabula_models::{
    bert::{BertConfig, BertModel},
    catalog::{MINILM, SMOLLM2},
    llama::Generator,
};

#[test]
fn truncated_or_corrupted_safetensors_are_errors() {
    let weights = model_file(MINILM.files[0].local_path);
    let config = BertConfig::from_json(&model_file(MINILM.files[1].local_path)).unwrap();
    let header_len = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    // Truncations: inside the length prefix, inside the JSON header, inside the tensor data.
    for cut in [
        0,
        4,
        8,
        20,
        header_len / 2,
        header_len + 8,
        header_len + 1000,
        weights.len() - 1,
    ] {
        let err = BertModel::load(&CpuBackend, &weights[..cut], config.clone())
            .err()
            .expect("truncated file must fail");
        assert!(
            err.to_string().contains("safetensors"),
            "cut at {cut}: {err}"
        );
    }
    // Byte flips in the JSON header (names, dtypes, shapes, offsets). Only the first layer is
    // loaded so each attempt stays cheap.
    let mut next = rng(42);
    let mut rejected = 0;
    for _ in 0..300 {
        let mut bad = weights[..8 + header_len].to_vec();
        for _ in 0..1 + next() % 3 {
            let at = 8 + (next() as usize % header_len);
            bad[at] = next() as u8;
        }
        bad.extend_from_slice(&weights[8 + header_len..]);
        if BertModel::load_layers(&CpuBackend, &bad, config.clone(), 0..1).is_err() {
            rejected += 1;
        }
    }
    assert!(
        rejected > 100,
        "most header corruptions must be caught, only {rejected} of 300 were"
    );
    // A config that does not match the weights.
    let mut wrong = config.clone();
    wrong.hidden_size = 512;
    wrong.num_attention_heads = 8;
    assert!(
        BertModel::load(&CpuBackend, &weights, wrong)
            .err()
            .unwrap()
            .to_string()
            .contains("shape")
    );
}

#[test]
fn truncated_or_corrupted_gguf_is_an_error() {
    let bytes = model_file(SMOLLM2.files[0].local_path);
    for cut in [
        0,
        3,
        24,
        1000,
        100_000,
        1_785_664,
        bytes.len() / 2,
        bytes.len() - 1,
    ] {
        let err = Generator::load(&CpuBackend, &bytes[..cut])
            .err()
            .expect("truncated GGUF must fail");
        assert!(!err.to_string().is_empty());
    }
    // Corrupt the metadata region (header, vocabulary, merges) at random.
    let mut next = rng(7);
    for _ in 0..200 {
        let mut bad = bytes[..1_785_664].to_vec();
        for _ in 0..1 + next() % 4 {
            let at = next() as usize % bad.len();
            bad[at] = next() as u8;
        }
        // Only the parse and tokenizer stages: with the tensor data cut off the loader must stop
        // with an error whatever the header now says.
        assert!(Generator::load(&CpuBackend, &bad).is_err());
    }
}
