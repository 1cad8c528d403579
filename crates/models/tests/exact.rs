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
        StageInput, StageOutput, quantize_bert, quantize_llama, split_pieces, stage_pieces,
        stage_ranges, stage_slice,
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
    embed_file(backend, &ExactFile::open(bytes, hash).unwrap())
}

fn embed_file<B: ExactBackend>(backend: &B, file: &ExactFile<'_>) -> Vec<ExactEmbedding> {
    let tokenizer = model_file(MINILM.files[2].local_path);
    let embedder = ExactEmbedder::load(backend, file, &tokenizer).unwrap();
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

    // Read from disk a tensor at a time (how the CLI and native workers load): the same bits.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("minilm.exact.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    let from_disk = embed_file(&CpuBackend, &ExactFile::open_path(&path, &hash).unwrap());
    for (c, d) in cpu.iter().zip(&from_disk) {
        assert_eq!(c.sha256, d.sha256);
    }
    let err = ExactFile::open_path(&path, &"0".repeat(64)).err().unwrap();
    assert!(err.to_string().contains("hashes to"), "{err}");

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
    let (bytes, hash) = smol_exact();
    let cpu = greedy_all(&CpuBackend, bytes, hash, 8);
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

    let gpu = greedy_all(&gpu(), bytes, hash, 8);
    assert_eq!(
        cpu, gpu,
        "exact logits or tokens differ between CPU and GPU"
    );
}

/// The quantised SmolLM2 file, made once per test binary.
fn smol_exact() -> &'static (Vec<u8>, String) {
    static FILE: std::sync::OnceLock<(Vec<u8>, String)> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        quantize_llama(SMOLLM2.name, &model_file(SMOLLM2.files[0].local_path))
            .expect("quantise SmolLM2")
    })
}

/// Greedy generation through `stages` (each a loaded stage with its own cache), handing each
/// stage's hidden rows to the next, as a pipeline of volunteers does.
fn pipeline_greedy<B: ExactBackend>(
    backend: &B,
    stages: &[ExactLlama<B>],
    prompt: &[u32],
    tokens: usize,
) -> Vec<ExactStep> {
    let mut caches: Vec<_> = stages
        .iter()
        .map(|s| s.new_cache(backend, prompt.len() + tokens).unwrap())
        .collect();
    let mut sampler = ExactSampler::greedy();
    let (mut next, mut pos, mut out) = (prompt.to_vec(), 0, Vec::new());
    while out.len() < tokens {
        let mut hidden = Vec::new();
        let mut logits = None;
        for (stage, cache) in stages.iter().zip(&mut caches) {
            let input = if hidden.is_empty() {
                StageInput::Tokens(&next)
            } else {
                StageInput::Hidden {
                    rows: next.len(),
                    values: &hidden,
                }
            };
            match pollster::block_on(stage.step_stage(backend, input, pos, cache)).unwrap() {
                StageOutput::Hidden(h) => hidden = h,
                StageOutput::Logits(l) => logits = Some(l),
            }
        }
        let logits = logits.expect("the last stage gives logits");
        pos += next.len();
        let token = sampler.pick(&logits, stages[0].frac);
        out.push(ExactStep {
            token,
            logits_sha256: tabula_models::exact::hash_ints(&logits),
        });
        next = vec![token];
    }
    out
}

#[test]
fn smollm2_cut_into_pieces_runs_as_three_stages_with_the_whole_models_bits() {
    let (bytes, hash) = smol_exact();
    let pieces = split_pieces(bytes, hash).unwrap();
    let again = split_pieces(bytes, hash).unwrap();
    let layers = smol_generator(&CpuBackend, bytes, hash).model.config.layers;
    assert_eq!(pieces.len(), layers + 3);
    for (p, q) in pieces.iter().zip(&again) {
        assert_eq!(
            (&p.name, &p.sha256),
            (&q.name, &q.sha256),
            "cutting is deterministic"
        );
        assert_eq!(p.sha256, tabula_models::catalog::sha256_hex(&p.bytes));
    }
    let total: usize = pieces.iter().map(|p| p.bytes.len()).sum();
    let head = pieces
        .iter()
        .find(|p| p.name == "head")
        .unwrap()
        .bytes
        .len();
    eprintln!(
        "SmolLM2 exact: {} bytes whole, {total} in {} pieces (head {head})",
        bytes.len(),
        pieces.len()
    );

    let ranges = stage_ranges(layers, 3).unwrap();
    let stages: Vec<ExactLlama<CpuBackend>> = ranges
        .iter()
        .map(|r| {
            let mine = stage_slice(&pieces, layers, r);
            assert_eq!(mine.len(), stage_pieces(layers, r).len());
            let file = ExactFile::open_pieces(&mine).unwrap();
            ExactLlama::load_stage(&CpuBackend, &file, r.clone()).unwrap()
        })
        .collect();
    let whole = smol_generator(&CpuBackend, bytes, hash);
    for f in smollm2_fixtures().iter().take(3) {
        let mut s = ExactSampler::greedy();
        let (want, _) = pollster::block_on(whole.model.generate(
            &CpuBackend,
            &f.prompt_ids,
            6,
            &mut s,
            &[],
            |_| {},
        ))
        .unwrap();
        let got = pipeline_greedy(&CpuBackend, &stages, &f.prompt_ids, 6);
        assert_eq!(
            got, want,
            "three stages differ from the whole model on {:?}",
            f.prompt
        );
    }

    // A stage refuses what is not its own.
    let middle = &stages[1];
    let mut cache = middle.new_cache(&CpuBackend, 8).unwrap();
    let err = pollster::block_on(middle.step_stage(
        &CpuBackend,
        StageInput::Tokens(&[1, 2]),
        0,
        &mut cache,
    ))
    .err()
    .unwrap();
    assert!(err.to_string().contains("takes hidden rows"), "{err}");
    let err = pollster::block_on(middle.step_stage(
        &CpuBackend,
        StageInput::Hidden {
            rows: 2,
            values: &[0; 5],
        },
        0,
        &mut cache,
    ))
    .err()
    .unwrap();
    assert!(err.to_string().contains("are not 2 rows"), "{err}");
    let dim = middle.config.dim;
    let err = pollster::block_on(middle.step_stage(
        &CpuBackend,
        StageInput::Hidden {
            rows: 9,
            values: &vec![0; 9 * dim],
        },
        0,
        &mut cache,
    ))
    .err()
    .unwrap();
    assert!(err.to_string().contains("exceed the KV cache"), "{err}");
}

#[test]
fn pieces_are_checked_before_a_stage_uses_them() {
    let (bytes, hash) = smol_exact();
    let pieces = split_pieces(bytes, hash).unwrap();
    let by = |name: &str| pieces.iter().find(|p| p.name == name).unwrap();
    fn arg(p: &tabula_models::exact::Piece) -> (&[u8], String) {
        (p.bytes.as_slice(), p.sha256.clone())
    }

    // A flipped byte no longer hashes to the piece's name.
    let mut bad = by("layer.0").bytes.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let sha = by("layer.0").sha256.clone();
    let err = ExactFile::open_pieces(&[(&bad, &sha)]).err().unwrap();
    assert!(err.to_string().contains("hashes to"), "{err}");

    // The whole file is not a piece, and a piece is not a whole file.
    let err = ExactFile::open_pieces(&[(bytes.as_slice(), hash.as_str())])
        .err()
        .unwrap();
    assert!(err.to_string().contains("whole quantised model"), "{err}");
    let (b, s) = arg(by("tables"));
    let err = ExactFile::open(b, &s).err().unwrap();
    assert!(err.to_string().contains("one piece"), "{err}");

    // The same piece twice, or no piece at all.
    let err = ExactFile::open_pieces(&[(b, &s), (b, &s)]).err().unwrap();
    assert!(err.to_string().contains("given twice"), "{err}");
    assert!(ExactFile::open_pieces(&[]).is_err());

    // A stage whose layer piece is missing says which tensor it lacks.
    let (t, ts) = arg(by("tables"));
    let (e, es) = arg(by("embed"));
    let file = ExactFile::open_pieces(&[(t, &ts), (e, &es)]).unwrap();
    let err = ExactLlama::load_stage(&CpuBackend, &file, 0..1)
        .err()
        .unwrap();
    assert!(err.to_string().contains("layer.0"), "{err}");
    let layers = file_layers(&file);
    assert!(ExactLlama::load_stage(&CpuBackend, &file, 0..layers + 1).is_err());
    assert!(ExactLlama::load_stage(&CpuBackend, &file, 3..3).is_err());
}

fn file_layers(file: &ExactFile<'_>) -> usize {
    match &file.header.config {
        tabula_models::exact::ExactArch::Llama(c) => c.layers,
        _ => panic!("not a Llama"),
    }
}
