//! Gemma 3 270M (the Q4_K_M GGUF of `tabula models fetch gemma-3-270m`) against transformers'
//! f32 run of the same file (`tests/fixtures/make_gemma3.py`): its SentencePiece tokenizer on
//! texts in many scripts, the built-in chat format, and greedy continuations on the CPU and
//! the GPU (whose storage bindings of 128 MiB on lavapipe split the 671 MB embedding table).

mod common;

use common::*;
use tabula_engine::{Backend, cpu::CpuBackend, exact::ExactBackend};
use tabula_models::{
    catalog::GEMMA3_270M,
    exact::{ExactFile, ExactGenerator, ExactLlama, ExactStep, quantize_llama},
    gguf::GgufFile,
    llama::Generator,
    sampling::{ExactSampler, Sampler},
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

/// A long adversarial text (a run of one repeated pair the merges fold level by level,
/// spaces, control tokens back to back, text that looks like byte tokens, a character the
/// vocabulary holds only as bytes) tokenizes in one pass (the merge queue is a heap, never a
/// rescan per merge) and decodes back to itself.
#[test]
fn a_long_adversarial_text_tokenizes_and_decodes_back() {
    let bytes = model();
    let tokenizer = LlamaTokenizer::from_gguf(&GgufFile::parse(&bytes).unwrap()).unwrap();
    let text = format!(
        "{}{}{}{}{}",
        "ab".repeat(100_000),
        " ".repeat(20_000),
        "<start_of_turn>".repeat(2_000),
        "<0x41>".repeat(2_000),
        "\u{10FFFD}".repeat(5_000)
    );
    let ids = tokenizer.encode(&text).unwrap();
    assert!(
        ids.len() > 2_000 && ids.len() < text.len(),
        "{} ids",
        ids.len()
    );
    // Control tokens are not text: what decodes is the text without them.
    assert_eq!(
        tokenizer.decode(&ids).unwrap(),
        text.replace("<start_of_turn>", "")
    );
}

/// Gemma's GGUF with its vocabulary (token texts, scores and types: its first megabytes)
/// corrupted at random: each file is refused with an error or gives a tokenizer that works,
/// never a panic.
#[test]
fn a_corrupted_gemma_vocabulary_is_refused_or_tokenizes() {
    let mut bytes = model();
    let mut next = rng(11);
    let (mut loaded, mut refused) = (0, 0);
    for _ in 0..40 {
        let changed: Vec<(usize, u8)> = (0..1 + next() % 4)
            .map(|_| {
                let at = 24 + next() as usize % (6 << 20);
                let old = bytes[at];
                bytes[at] = next() as u8;
                (at, old)
            })
            .collect();
        let tokenizer = GgufFile::parse(&bytes)
            .map_err(tabula_models::ModelError::from)
            .and_then(|g| LlamaTokenizer::from_gguf(&g));
        match tokenizer {
            Ok(t) => {
                loaded += 1;
                if let Ok(ids) = t.encode("Hello, world! <start_of_turn>user\n東京 😀") {
                    let _ = t.decode(&ids);
                }
            }
            Err(e) => {
                refused += 1;
                assert!(!e.to_string().is_empty());
            }
        }
        for (at, old) in changed.into_iter().rev() {
            bytes[at] = old;
        }
    }
    assert_eq!(loaded + refused, 40);
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

/// Exact precision: the same bits (every step's logits hash) on the CPU and lavapipe, whose
/// 128 MiB bindings split the 168 MB int8 table; and close to the f32 reference. Measured
/// baseline (2026-12-07): the first 14 / 4 / 10 / 24 / 10 greedy tokens of the five prompts
/// equal the reference's (exact arithmetic is deterministic: these never vary between runs or
/// machines). Thresholds: the first token of every prompt, the first 8 of at least four.
#[test]
fn exact_precision_is_bit_identical_on_cpu_and_gpu_and_close_to_the_reference() {
    let gguf = model();
    let (bytes, hash) = quantize_llama(GEMMA3_270M.name, &gguf).expect("quantise Gemma 3");
    let fixtures = gemma3_fixtures();
    let run = |which: &[usize], tokens: usize, on_gpu: bool| -> Vec<Vec<ExactStep>> {
        let file = ExactFile::open(&bytes, &hash).unwrap();
        let tokenizer = LlamaTokenizer::from_gguf(&GgufFile::parse(&gguf).unwrap()).unwrap();
        let prompts: Vec<&[u32]> = which.iter().map(|&i| &fixtures[i].prompt_ids[..]).collect();
        if on_gpu {
            exact_greedy(&gpu(), &file, tokenizer, &prompts, tokens)
        } else {
            exact_greedy(&CpuBackend, &file, tokenizer, &prompts, tokens)
        }
    };
    let all: Vec<usize> = (0..fixtures.len()).collect();
    let cpu = run(&all, 24, false);
    let mut first_eight = 0;
    for (f, steps) in fixtures.iter().zip(&cpu) {
        let ids: Vec<u32> = steps.iter().map(|s| s.token).collect();
        let equal = ids
            .iter()
            .zip(&f.greedy_ids)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "{:?}: exact's first {equal} of {} greedy tokens equal f32's",
            f.prompt,
            ids.len()
        );
        assert!(
            equal >= 1,
            "{:?}: exact {ids:?}, f32 {:?}",
            f.prompt,
            f.greedy_ids
        );
        if equal >= 8 {
            first_eight += 1;
        }
    }
    assert!(
        first_eight >= 4,
        "only {first_eight} prompts agree on 8 tokens"
    );
    // Two prompts on the GPU, 8 steps each: every logit's bits.
    let gpu = run(&[0, 3], 8, true);
    let cpu_prefix: Vec<Vec<ExactStep>> = [0, 3].iter().map(|&i| cpu[i][..8].to_vec()).collect();
    assert_eq!(cpu_prefix, gpu, "exact steps differ between CPU and GPU");
}

/// Greedy exact generation of `tokens` steps after each of `prompts` on `backend`.
fn exact_greedy<B: ExactBackend>(
    backend: &B,
    file: &ExactFile<'_>,
    tokenizer: LlamaTokenizer,
    prompts: &[&[u32]],
    tokens: usize,
) -> Vec<Vec<ExactStep>> {
    let generator =
        ExactGenerator::new(ExactLlama::load(backend, file).unwrap(), tokenizer).unwrap();
    prompts
        .iter()
        .map(|ids| {
            let mut sampler = ExactSampler::greedy();
            pollster::block_on(generator.generate(backend, ids, tokens, &mut sampler, |_| {}))
                .unwrap()
                .0
        })
        .collect()
}
