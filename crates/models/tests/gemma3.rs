//! Gemma 3 270M (the Q4_K_M GGUF of `tabula models fetch gemma-3-270m`) against transformers'
//! f32 run of the same file (`tests/fixtures/make_gemma3.py`): its SentencePiece tokenizer on
//! texts in many scripts, the built-in chat format, and greedy continuations on the CPU and
//! the GPU (whose storage bindings of 128 MiB on lavapipe split the 671 MB embedding table).

mod common;

use common::*;
use tabula_engine::{Backend, cpu::CpuBackend};
use tabula_models::{
    catalog::GEMMA3_270M, gguf::GgufFile, llama::Generator, sampling::Sampler,
    tokenize::LlamaTokenizer,
};

/// Greedy tokens that must equal the reference before f32 rounding may part the two runs.
const MIN_EQUAL_TOKENS: usize = 16;

fn model() -> Vec<u8> {
    model_file(GEMMA3_270M.files[0].local_path)
}

#[test]
fn the_tokenizer_matches_transformers_and_decodes_back() {
    let bytes = model();
    let tokenizer = LlamaTokenizer::from_gguf(&GgufFile::parse(&bytes).unwrap()).unwrap();
    let fixtures = gemma3_token_fixtures();
    assert!(fixtures.len() > 30);
    for f in &fixtures {
        let ids = tokenizer.encode(&f.text).unwrap();
        assert_eq!(ids, f.ids, "ids of {:?}", f.text);
        assert_eq!(
            tokenizer.decode(&ids).unwrap(),
            f.text,
            "decoding {:?}",
            f.text
        );
    }
    // Control tokens written in the text are one token each; a byte the vocabulary lacks as
    // a piece falls back to byte tokens.
    let turn = tokenizer.encode("<start_of_turn>user\nhi").unwrap();
    assert_eq!(turn[..2], [2, 105], "BOS then <start_of_turn>");
    assert_eq!(tokenizer.decode(&turn).unwrap(), "user\nhi");
}

/// Greedy continuations of the fixture prompts `which` on `backend`.
fn check_greedy<B: Backend>(backend: &B, which: &[usize]) {
    let bytes = model();
    let generator = Generator::load(backend, &bytes).expect("load Gemma 3");
    let fixtures = gemma3_fixtures();
    for f in which.iter().map(|&i| &fixtures[i]) {
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
        let equal = out
            .iter()
            .zip(&f.greedy_ids)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "{:?} on {}: {equal} of {} greedy tokens equal the reference",
            f.prompt,
            backend.describe(),
            f.greedy_ids.len()
        );
        assert!(
            equal >= MIN_EQUAL_TOKENS.min(f.greedy_ids.len()),
            "greedy continuation of {:?} on {}: {out:?}, reference {:?}",
            f.prompt,
            backend.describe(),
            f.greedy_ids
        );
    }
}

#[test]
fn cpu_reproduces_reference_greedy_tokens() {
    check_greedy(&CpuBackend, &[0, 1, 2, 3, 4]);
}

/// Two prompts (a text and a chat turn): a software GPU takes a second per token here.
#[test]
fn gpu_reproduces_reference_greedy_tokens() {
    check_greedy(&gpu(), &[0, 3]);
}

/// The first step's logits, which greedy agreement alone would hide.
#[test]
fn first_step_logits_match_the_reference() {
    let bytes = model();
    let backend = CpuBackend;
    let generator = Generator::load(&backend, &bytes).unwrap();
    let text = std::fs::read_to_string(fixtures_dir().join("gemma3.jsonl")).unwrap();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let ids: Vec<u32> = serde_json::from_value(v["prompt_ids"].clone()).unwrap();
        let top: Vec<u32> = serde_json::from_value(v["first_step_top5_ids"].clone()).unwrap();
        let logits: Vec<f32> = serde_json::from_value(v["first_step_top5_logits"].clone()).unwrap();
        let model = &generator.model;
        let mut cache = model.new_cache(&backend, ids.len()).unwrap();
        let h = model.embed_tokens(&backend, &ids, 0).unwrap();
        let h = model.run_layers(&backend, h, &mut cache).unwrap();
        let ours = pollster::block_on(backend.read(&model.head(&backend, &h).unwrap())).unwrap();
        for (&id, &want) in top.iter().zip(&logits) {
            let got = ours[id as usize];
            assert!(
                (got - want).abs() < 0.02 * want.abs().max(1.0),
                "logit of {id} after {ids:?}: {got}, reference {want}"
            );
        }
        assert_eq!(Sampler::greedy().pick(&ours), top[0]);
    }
}
