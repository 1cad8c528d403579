//! The byte-level BPE pre-tokenisers a GGUF names (`tokenizer.ggml.pre`: `qwen2`,
//! `llama-bpe`, `gpt-2`, `smollm`, `default`), each on SmolLM2's vocabulary and merges, against llama.cpp's
//! own tokenizer (`tests/fixtures/pretokenizers.json`, from
//! `tests/fixtures/make_pretokenizer_ggufs.py --reference`): the same ids for texts with
//! contractions in capitals, digit runs, punctuation before words, newlines and runs of spaces,
//! and non-Latin scripts. An unknown pre-tokeniser is refused by name. Needs SmolLM2 (`tabula
//! models fetch`) and `python3` with `gguf` and `numpy` (or `$TABULA_PYLIB`).

mod common;

use common::*;
use tabula_models::{gguf::GgufFile, tokenize::LlamaTokenizer};

#[test]
fn each_pre_tokeniser_splits_as_llama_cpp_does() {
    let dir = tempfile::tempdir().unwrap();
    let smollm =
        tabula_models::catalog::default_models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        smollm.exists(),
        "{} is missing: run `cargo run -p tabula-cli -- models fetch`",
        smollm.display()
    );
    generate(
        "make_pretokenizer_ggufs.py",
        dir.path(),
        &["--smollm".as_ref(), smollm.as_os_str()],
    );
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures_dir().join("pretokenizers.json")).unwrap(),
    )
    .unwrap();
    let texts: Vec<&str> = reference["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let mut distinct: Vec<&serde_json::Value> = Vec::new();
    for pre in ["qwen2", "llama-bpe", "gpt-2", "smollm", "default"] {
        let bytes = std::fs::read(dir.path().join(format!("pre-{pre}.gguf"))).unwrap();
        assert_eq!(
            tabula_models::catalog::sha256_hex(&bytes),
            reference[pre]["gguf_sha256"].as_str().unwrap(),
            "{pre}: the generator made another file than the reference was computed from"
        );
        let tokenizer = LlamaTokenizer::from_gguf(&GgufFile::parse(&bytes).unwrap())
            .unwrap_or_else(|e| panic!("{pre}: {e}"));
        for (text, want) in texts.iter().zip(reference[pre]["ids"].as_array().unwrap()) {
            let want: Vec<u32> = want
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            // `encode` adds no BOS for this vocabulary's files (none is asked for).
            let got = tokenizer.encode(text).unwrap();
            let got = got.strip_prefix(&[1u32][..]).unwrap_or(&got).to_vec();
            assert_eq!(got, want, "{pre}: {text:?}");
        }
        if !distinct.contains(&&reference[pre]["ids"]) {
            distinct.push(&reference[pre]["ids"]);
        }
    }
    // The texts tell the pre-tokenisers apart (the test would pass for any one otherwise):
    // SmolLM2's vocabulary has no token of two digits, so digit grouping cannot show, but
    // GPT-2's, Qwen2's and the default splitting give three different results.
    assert_eq!(distinct.len(), 3, "the texts tell the pre-tokenisers apart");

    // An unknown pre-tokeniser is refused by name.
    let mut bytes = std::fs::read(dir.path().join("pre-gpt-2.gguf")).unwrap();
    let key = bytes
        .windows(18)
        .position(|w| w == b"tokenizer.ggml.pre")
        .unwrap();
    let at = key + bytes[key..].windows(5).position(|w| w == b"gpt-2").unwrap();
    bytes[at..at + 5].copy_from_slice(b"xyz-9");
    let err = LlamaTokenizer::from_gguf(&GgufFile::parse(&bytes).unwrap())
        .err()
        .expect("an unknown pre-tokeniser is refused")
        .to_string();
    assert!(
        err.contains("pre-tokeniser `xyz-9` (tokenizer.ggml.pre) is not supported"),
        "{err}"
    );
}
