//! Fidelity of exact precision against fast (fp32), for BENCHMARKS.md:
//! MiniLM: the cosine distribution over the fixture texts;
//! SmolLM2: next-token top-1 agreement along a longer text (teacher-forced, every position).
//!
//! `cargo run --release -p tabula-models --example exact_fidelity` (after `tabula models fetch`
//! and `tabula models quantize`).

use tabula_engine::{Backend, cpu::CpuBackend};
use tabula_models::{
    bert::SentenceEmbedder,
    catalog::{self, MINILM, SMOLLM2},
    exact::{ExactEmbedder, ExactFile, ExactLlama, hash_in_name},
    gguf::GgufFile,
    llama::LlamaModel,
    sampling::argmax,
    tokenize::LlamaTokenizer,
};

const LONG_TEXT: &str = "Volunteer computing began in the late 1990s, when projects such as \
GIMPS and SETI@home asked people to donate the idle cycles of their home computers. The \
Berkeley Open Infrastructure for Network Computing, BOINC, generalised the idea: a server hands \
out work units, clients compute them, and results are validated by sending each unit to more \
than one volunteer and comparing what comes back. Because some volunteers cheat and some \
machines are simply broken, redundancy is the price of trust. Floating-point arithmetic makes \
that comparison hard, since different processors round differently, so projects compare \
results with tolerances. Modern browsers can now run neural networks on the graphics card \
through WebGPU, which opens volunteer computing to anyone who can open a web page. The open \
question is how to verify such work cheaply and with certainty.";

fn read(path: &str) -> Vec<u8> {
    let p = catalog::default_models_dir().join(path);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn quantised(model: &str) -> (Vec<u8>, String) {
    let dir = catalog::default_models_dir();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if let Some(hash) = hash_in_name(model, &name) {
            return (std::fs::read(dir.join(&name)).unwrap(), hash.to_string());
        }
    }
    panic!("no quantised file of {model}: run `tabula models quantize`");
}

fn main() {
    let backend = CpuBackend;
    // MiniLM: cosine between exact and fp32 embeddings of the fixture texts.
    let fixtures = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/minilm.jsonl"),
    )
    .unwrap();
    let texts: Vec<String> = fixtures
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let fast = SentenceEmbedder::load(
        &backend,
        &read(MINILM.files[1].local_path),
        &read(MINILM.files[0].local_path),
        &read(MINILM.files[2].local_path),
    )
    .unwrap();
    let (bytes, hash) = quantised(MINILM.name);
    let exact = ExactEmbedder::load(
        &backend,
        &ExactFile::open(&bytes, &hash).unwrap(),
        &read(MINILM.files[2].local_path),
    )
    .unwrap();
    let f = pollster::block_on(fast.embed(&backend, &texts)).unwrap();
    let e = pollster::block_on(exact.embed(&backend, &texts)).unwrap();
    let mut cos: Vec<f64> = f
        .iter()
        .zip(&e)
        .map(|(a, b)| {
            let b = b.to_f32();
            let dot: f64 = a
                .vector
                .iter()
                .zip(&b)
                .map(|(x, y)| (*x as f64) * (*y as f64))
                .sum();
            let nb: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
            dot / nb
        })
        .collect();
    cos.sort_by(f64::total_cmp);
    let mean = cos.iter().sum::<f64>() / cos.len() as f64;
    println!(
        "MiniLM exact vs fast over {} texts: mean cosine {mean:.6}, min {:.6}, p10 {:.6}, median {:.6}, max {:.6}",
        cos.len(),
        cos[0],
        cos[cos.len() / 10],
        cos[cos.len() / 2],
        cos[cos.len() - 1]
    );

    // SmolLM2: teacher-forced top-1 agreement along LONG_TEXT.
    let gguf_bytes = read(SMOLLM2.files[0].local_path);
    let gguf = GgufFile::parse(&gguf_bytes).unwrap();
    let tokenizer = LlamaTokenizer::from_gguf(&gguf).unwrap();
    let ids = tokenizer.encode(LONG_TEXT).unwrap();
    let fast = LlamaModel::load(&backend, &gguf, &gguf_bytes).unwrap();
    let (bytes, hash) = quantised(SMOLLM2.name);
    let exact = ExactLlama::load(&backend, &ExactFile::open(&bytes, &hash).unwrap()).unwrap();
    let mut fcache = fast.new_cache(&backend, ids.len()).unwrap();
    let mut ecache = exact.new_cache(&backend, ids.len()).unwrap();
    let mut agree = 0;
    for (pos, &id) in ids.iter().enumerate().take(ids.len() - 1) {
        let h = fast.embed_tokens(&backend, &[id], pos).unwrap();
        let h = fast.run_layers(&backend, h, &mut fcache).unwrap();
        let fl = pollster::block_on(backend.read(&fast.head(&backend, &h).unwrap())).unwrap();
        let el = pollster::block_on(exact.step(&backend, &[id], pos, &mut ecache)).unwrap();
        let em = *el.iter().max().unwrap();
        let e_top = el.iter().position(|&v| v == em).unwrap() as u32;
        agree += usize::from(argmax(&fl) == e_top);
    }
    println!(
        "SmolLM2 exact vs fast: next-token top-1 agreement {agree}/{} ({:.1}%) along a {}-token text",
        ids.len() - 1,
        100.0 * agree as f64 / (ids.len() - 1) as f64,
        ids.len()
    );
}
