//! Pipeline stages with the real SmolLM2 in exact precision: three stages, each loaded from
//! only its own pieces and signing every step, generate the whole model's tokens and logits;
//! activations that were tampered with, replayed or signed by another key are refused.

use tabula_engine::cpu::CpuBackend;
use tabula_models::{
    catalog::{SMOLLM2, default_models_dir},
    exact::{
        ExactArch, ExactFile, ExactLlama, Piece, quantize_llama, split_pieces, stage_ranges,
        stage_slice,
    },
    gguf::GgufFile,
    sampling::ExactSampler,
    tokenize::LlamaTokenizer,
};
use tabula_protocol::{Bytes, Identity, sign::SignerKey};
use tabula_worker::stage::{StageOut, StagePlan, StageRunner, tokens_hash};

struct Smol {
    whole: (Vec<u8>, String),
    pieces: Vec<Piece>,
    prompt: Vec<u32>,
}

fn smol() -> &'static Smol {
    static SMOL: std::sync::OnceLock<Smol> = std::sync::OnceLock::new();
    SMOL.get_or_init(|| {
        let path = default_models_dir().join(SMOLLM2.files[0].local_path);
        let gguf = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "cannot read {} ({e}); run `cargo run -p tabula-cli -- models fetch`",
                path.display()
            )
        });
        let tokenizer = LlamaTokenizer::from_gguf(&GgufFile::parse(&gguf).unwrap()).unwrap();
        let prompt = tokenizer
            .encode(&tokenizer.chat_prompt("Name three colours.").unwrap())
            .unwrap();
        let whole = quantize_llama(SMOLLM2.name, &gguf).unwrap();
        let pieces = split_pieces(&whole.0, &whole.1).unwrap();
        Smol {
            whole,
            pieces,
            prompt,
        }
    })
}

const NEW_TOKENS: usize = 8;

/// Three runners, each from only the pieces its layers need.
fn pipeline(keys: &[Identity], sampler: (u32, u32, u64)) -> Vec<StageRunner<CpuBackend>> {
    let s = smol();
    let layers = match ExactFile::open(&s.whole.0, &s.whole.1)
        .unwrap()
        .header
        .config
    {
        ExactArch::Llama(c) => c.layers,
        ExactArch::Bert(_) => panic!("SmolLM2 is a Llama"),
    };
    let ranges = stage_ranges(layers, keys.len()).unwrap();
    ranges
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let file = ExactFile::open_pieces(&stage_slice(&s.pieces, layers, r)).unwrap();
            let plan = StagePlan {
                session: Bytes([5; 16]),
                stage: i as u16,
                layers: r.clone(),
                capacity: s.prompt.len() + NEW_TOKENS,
                upstream: (i > 0).then(|| keys[i - 1].public()),
                first_step: 0,
                temperature_milli: sampler.0,
                top_p_q16: sampler.1,
                seed: sampler.2,
            };
            StageRunner::load(&CpuBackend, &file, plan).unwrap()
        })
        .collect()
}

fn keys(n: u8) -> Vec<Identity> {
    (0..n).map(|i| Identity::from_seed([40 + i; 32])).collect()
}

/// Runs one step through every stage; checks each commitment chains to the one before.
fn step(
    runners: &mut [StageRunner<CpuBackend>],
    keys: &[Identity],
    tokens: &[u32],
) -> (u32, String) {
    let b = &CpuBackend;
    let mut out = pollster::block_on(runners[0].run_tokens(b, &keys[0], tokens)).unwrap();
    assert_eq!(out.commit().input_hash, tokens_hash(tokens));
    for (i, r) in runners.iter_mut().enumerate().skip(1) {
        let StageOut::Activation(a) = &out else {
            panic!("stage {} gave a token", i - 1)
        };
        let next = pollster::block_on(r.run_activation(b, &keys[i], a)).unwrap();
        assert_eq!(next.commit().input_hash, a.commit.output_hash);
        out = next;
    }
    let StageOut::Token { token, commit } = out else {
        panic!("the last stage gave no token")
    };
    commit
        .verify(&SignerKey::parse(&keys[keys.len() - 1].public()).unwrap())
        .unwrap();
    (token, commit.output_hash.to_hex())
}

fn compare_with_whole_model(sampler: (u32, u32, u64)) {
    let s = smol();
    let file = ExactFile::open(&s.whole.0, &s.whole.1).unwrap();
    let whole = ExactLlama::load(&CpuBackend, &file).unwrap();
    let mut sm = ExactSampler::from_parts(sampler.0, sampler.1, sampler.2);
    let (want, _) = pollster::block_on(whole.generate(
        &CpuBackend,
        &s.prompt,
        NEW_TOKENS,
        &mut sm,
        &[],
        |_| {},
    ))
    .unwrap();

    let keys = keys(3);
    let mut runners = pipeline(&keys, sampler);
    let mut next = s.prompt.clone();
    for (i, w) in want.iter().enumerate() {
        let (token, logits) = step(&mut runners, &keys, &next);
        assert_eq!(
            (token, logits.as_str()),
            (w.token, w.logits_sha256.as_str()),
            "step {i}"
        );
        next = vec![token];
    }
}

#[test]
fn three_stages_generate_the_whole_models_tokens_greedy() {
    compare_with_whole_model((0, 65536, 0));
}

#[test]
fn three_stages_generate_the_whole_models_tokens_sampled() {
    compare_with_whole_model((800, 58982, 1234));
}

#[test]
fn a_stage_refuses_activations_it_cannot_trust_and_goes_on() {
    let s = smol();
    let keys = keys(3);
    let mut runners = pipeline(&keys, (0, 65536, 0));
    let b = &CpuBackend;
    let StageOut::Activation(good) =
        pollster::block_on(runners[0].run_tokens(b, &keys[0], &s.prompt)).unwrap()
    else {
        panic!()
    };
    let mut flipped = good.clone();
    flipped.data[100] ^= 1;
    let mut forged = good.clone();
    forged.commit = keys[2].stage_commit(
        good.commit.session,
        0,
        0,
        good.commit.input_hash,
        good.commit.output_hash,
    );
    let mut truncated = good.clone();
    truncated.data.truncate(good.data.len() - 4);
    truncated.commit = keys[0].stage_commit(
        good.commit.session,
        0,
        0,
        good.commit.input_hash,
        tabula_protocol::sha256(&truncated.data),
    );
    for (what, bad) in [
        ("a flipped byte", &flipped),
        ("another key's commitment", &forged),
        ("a short message, honestly signed", &truncated),
    ] {
        let err = pollster::block_on(runners[1].run_activation(b, &keys[1], bad))
            .err()
            .unwrap_or_else(|| panic!("{what} accepted"));
        eprintln!("{what}: {err}");
        assert_eq!(runners[1].step(), 0, "{what} changed the stage's state");
    }
    // A plan whose stage number contradicts its layers is refused at load.
    let mut plan = runners[1].plan().clone();
    plan.stage = 0;
    let layers = plan.layers.clone();
    let file = ExactFile::open_pieces(&stage_slice(&s.pieces, 30, &layers)).unwrap();
    let err = StageRunner::load(&CpuBackend, &file, plan)
        .err()
        .expect("stage 0 with an upstream stage");
    assert!(err.to_string().contains("stage 0"), "{err}");
    // Tokens to a middle stage, an activation to the first.
    assert!(pollster::block_on(runners[1].run_tokens(b, &keys[1], &[1])).is_err());
    assert!(pollster::block_on(runners[0].run_activation(b, &keys[0], &good)).is_err());
    // The honest activation still works, and once used it cannot be replayed at step 1.
    pollster::block_on(runners[1].run_activation(b, &keys[1], &good)).unwrap();
    let err = pollster::block_on(runners[1].run_activation(b, &keys[1], &good))
        .expect_err("a replayed step");
    assert!(err.to_string().contains("step 0"), "{err}");
}
