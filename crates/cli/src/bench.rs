//! `tabula bench`: our throughput next to the peers (onnxruntime, PyTorch), in one run, on the
//! same inputs. The peers run from `bench/peers.py` in a Python environment of the user's
//! choosing; it writes the exact texts it measured, and we measure those same texts.

use std::{path::PathBuf, process::Command, time::Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::{Deserialize, Serialize};
use tabula_engine::{Backend, cpu::CpuBackend, exact::ExactBackend};
use tabula_models::sampling::{ExactSampler, Sampler};

use crate::{BackendChoice, Precision};

#[derive(Args)]
pub struct BenchArgs {
    /// Python interpreter with the peers' packages (torch, onnxruntime, transformers, gguf);
    /// without it only our numbers are measured, on texts from --texts.
    #[arg(long, env = "TABULA_BENCH_PYTHON")]
    peers_python: Option<PathBuf>,
    /// The peers' script.
    #[arg(long, default_value = "bench/peers.py")]
    peers_script: PathBuf,
    /// Threads: the peers' intra-op threads, and on our CPU the compute threads, each
    /// embedding its own batches with its own copy of the model (as `tabula worker --threads N`
    /// runs units side by side). SmolLM2 runs on one thread.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    threads: u32,
    /// Benchmark texts (JSON written by `peers.py --texts-out`), when the peers are not run.
    #[arg(long)]
    texts: Option<PathBuf>,
    /// Our backends to measure.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "cpu,gpu")]
    backends: Vec<BackendChoice>,
    /// Precisions to measure (each on every backend).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "fast,exact")]
    precisions: Vec<Precision>,
    /// Only one model.
    #[arg(long, value_parser = ["minilm", "smollm2", "gemma3"])]
    only: Option<String>,
    /// Repetitions; the best is reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Write all results as JSON here.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Where the PyTorch peers run: `cpu`, or `cuda` (an NVIDIA GPU: then only PyTorch runs,
    /// as torch-fp32-cuda, next to our GPU backend; see scripts/gpu-bench.sh).
    #[arg(long, value_parser = ["cpu", "cuda"], default_value = "cpu")]
    peers_device: String,
    /// Models directory [default: $TABULA_MODELS or ~/.cache/tabula/models].
    #[arg(long)]
    models_dir: Option<PathBuf>,
}

#[derive(Deserialize)]
struct Texts {
    short: Vec<String>,
    long: Vec<String>,
    /// SmolLM2's ids of the prompt.
    prompt_ids: Vec<u32>,
    /// The prompt as text.
    #[serde(default)]
    prompt: Option<String>,
    /// Gemma 3's ids of the prompt (llama.cpp's tokenizer; absent: ours, of `prompt`).
    #[serde(default)]
    gemma_prompt_ids: Option<Vec<u32>>,
}

/// A generation model measured: the task prefix in the table, the model, its prompt ids.
struct Generation {
    task: &'static str,
    model: &'static str,
    prompt: Vec<u32>,
}

/// The most prompt tokens a generation benchmark feeds.
const MAX_PROMPT: usize = 128;

/// The generation models to measure: SmolLM2 on the peers' ids, Gemma 3 on llama.cpp's ids
/// of the same prompt (or ours, when the peers did not give them).
fn generations(args: &BenchArgs, texts: &Texts) -> Result<Vec<Generation>> {
    let wanted = |key: &str| args.only.as_deref().is_none_or(|only| only == key);
    let mut out = Vec::new();
    if wanted("smollm2") {
        out.push(Generation {
            task: "smollm2",
            model: "SmolLM2-135M-Instruct",
            prompt: texts.prompt_ids.clone(),
        });
    }
    if wanted("gemma3") {
        let prompt = match (&texts.gemma_prompt_ids, &texts.prompt) {
            (Some(ids), _) => ids.clone(),
            (None, Some(text)) => {
                let dir = crate::models_dir(args.models_dir.clone());
                let generator = crate::run::load_generator(&CpuBackend, &dir, "gemma-3-270m")?;
                let mut ids = generator.tokenizer.encode(text)?;
                ids.truncate(MAX_PROMPT);
                ids
            }
            (None, None) => bail!("the benchmark texts have no prompt for Gemma 3"),
        };
        out.push(Generation {
            task: "gemma3",
            model: "gemma-3-270m",
            prompt,
        });
    }
    Ok(out)
}

#[derive(Clone, Debug, Deserialize, Serialize)]
struct Measurement {
    peer: String,
    task: String,
    unit: String,
    value: f64,
}

#[derive(Deserialize)]
struct PeerReport {
    results: Vec<Measurement>,
}

const BATCH: usize = 32;
const DECODE_TOKENS: usize = 64;

pub fn bench(args: BenchArgs) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (texts_path, peers) = match &args.peers_python {
        Some(python) => {
            let texts = tmp.path().join("texts.json");
            eprintln!(
                "running the peers: {} {} --threads {}",
                python.display(),
                args.peers_script.display(),
                args.threads
            );
            let mut cmd = Command::new(python);
            cmd.arg(&args.peers_script)
                .args([
                    "--json",
                    "--threads",
                    &args.threads.to_string(),
                    "--reps",
                    &args.reps.to_string(),
                    "--texts-out",
                ])
                .arg(&texts);
            if let Some(only) = &args.only {
                cmd.args(["--only", only]);
            }
            cmd.args(["--device", &args.peers_device]);
            if let Some(dir) = &args.models_dir {
                cmd.arg("--models-dir").arg(dir);
            }
            let out = cmd
                .stderr(std::process::Stdio::inherit())
                .output()
                .with_context(|| format!("cannot run {}", python.display()))?;
            if !out.status.success() {
                bail!(
                    "the peers' benchmark failed ({}); see its messages above",
                    out.status
                );
            }
            let report: PeerReport = serde_json::from_slice(&out.stdout)
                .context("the peers' script printed no valid JSON")?;
            (texts, report.results)
        }
        None => (
            args.texts.clone().context(
                "give --peers-python (to run the peers and get their texts) or --texts FILE",
            )?,
            Vec::new(),
        ),
    };
    let texts: Texts = serde_json::from_slice(
        &std::fs::read(&texts_path)
            .with_context(|| format!("cannot read {}", texts_path.display()))?,
    )
    .context("benchmark texts must be JSON with short, long and prompt_ids")?;
    let mut ours = Vec::new();
    for &backend in &args.backends {
        let gpu = match backend {
            BackendChoice::Cpu => None,
            BackendChoice::Gpu => Some(crate::run::gpu_backend()?),
        };
        let device = gpu.as_ref().map_or("tabula-cpu".to_string(), |g| {
            format!("tabula-gpu ({})", g.describe())
        });
        for &precision in &args.precisions {
            let name = match precision {
                Precision::Fast => device.clone(),
                Precision::Exact => format!("{device} exact"),
            };
            let threads = args.threads as usize;
            if gpu.is_none()
                && threads > 1
                && args.only.as_deref().is_none_or(|only| only == "minilm")
            {
                ours.extend(minilm_on_threads(threads, precision, &name, &texts, &args)?);
            }
            ours.extend(match (&gpu, precision) {
                (None, Precision::Fast) => measure(&CpuBackend, &name, &texts, &args)?,
                (None, Precision::Exact) => measure_exact(&CpuBackend, &name, &texts, &args)?,
                (Some(g), Precision::Fast) => measure(g, &name, &texts, &args)?,
                (Some(g), Precision::Exact) => measure_exact(g, &name, &texts, &args)?,
            });
        }
    }
    print_table(&ours, &peers);
    if let Some(path) = &args.json_out {
        std::fs::write(
            path,
            serde_json::to_vec_pretty(
                &serde_json::json!({ "ours": ours, "peers": peers, "threads": args.threads }),
            )?,
        )?;
    }
    Ok(())
}

fn best_of<T>(reps: usize, mut f: impl FnMut() -> Result<T>) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        f()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn record(name: &str, task: &str, unit: &str, value: f64) -> Measurement {
    eprintln!("{name:40} {task:22} {value:10.1} {unit}");
    Measurement {
        peer: name.to_string(),
        task: task.to_string(),
        unit: unit.to_string(),
        value,
    }
}

/// A benchmark task name and its token ids.
type Workload = (&'static str, Vec<Vec<u32>>);

/// The two MiniLM workloads: task name and token ids. Tokenisation is outside the timing, as
/// for the peers; long texts are cut to 128 tokens keeping [SEP], as the peers' tokenizer does.
fn minilm_workloads(
    tokenize: impl Fn(&[String]) -> Result<Vec<Vec<u32>>>,
    texts: &Texts,
) -> Result<Vec<Workload>> {
    let mut out = Vec::new();
    for (task, list, cut) in [
        ("minilm-short-b32", &texts.short, None),
        ("minilm-long-b32", &texts.long, Some(128)),
    ] {
        let mut ids = tokenize(list)?;
        if let Some(cut) = cut {
            for seq in &mut ids {
                if seq.len() > cut {
                    let sep = *seq.last().unwrap_or(&0);
                    seq.truncate(cut - 1);
                    seq.push(sep);
                }
            }
        }
        out.push((task, ids));
    }
    Ok(out)
}

/// MiniLM on `threads` CPU threads side by side, each with its own model embedding every
/// `threads`-th batch (as a worker's compute threads run units): sentences/s of them all.
fn minilm_on_threads(
    threads: usize,
    precision: Precision,
    name: &str,
    texts: &Texts,
    args: &BenchArgs,
) -> Result<Vec<Measurement>> {
    let dir = crate::models_dir(args.models_dir.clone());
    let name = format!("{name} ×{threads} threads");
    let mut out = Vec::new();
    macro_rules! run {
        ($load:expr, $tokenize:expr) => {{
            let mut models = (0..threads)
                .map(|_| {
                    let mut m = $load?;
                    m.batch_size = BATCH;
                    Ok(m)
                })
                .collect::<Result<Vec<_>>>()?;
            let first = &models[0];
            let workloads = minilm_workloads(|list| $tokenize(first, list), texts)?;
            for (task, ids) in workloads {
                for m in models.iter_mut() {
                    pollster::block_on(m.embed_ids(&CpuBackend, &ids[..BATCH.min(ids.len())]))?;
                }
                let secs = best_of(args.reps, || {
                    std::thread::scope(|scope| {
                        let running: Vec<_> = models
                            .iter_mut()
                            .enumerate()
                            .map(|(t, m)| {
                                let ids = &ids;
                                scope.spawn(move || -> Result<()> {
                                    for batch in ids.chunks(BATCH).skip(t).step_by(threads) {
                                        pollster::block_on(m.embed_ids(&CpuBackend, batch))?;
                                    }
                                    Ok(())
                                })
                            })
                            .collect();
                        running.into_iter().try_for_each(|r| {
                            r.join()
                                .map_err(|_| anyhow::anyhow!("a benchmark thread panicked"))?
                        })
                    })
                })?;
                out.push(record(&name, task, "sentences/s", ids.len() as f64 / secs));
            }
        }};
    }
    match precision {
        Precision::Exact => run!(
            crate::run::load_exact_embedder(&CpuBackend, &dir, "all-MiniLM-L6-v2"),
            |m: &tabula_models::exact::ExactEmbedder<CpuBackend>, list: &[String]| {
                list.iter()
                    .map(|t| Ok(m.tokenizer.encode(t)?))
                    .collect::<Result<Vec<Vec<u32>>>>()
            }
        ),
        Precision::Fast => run!(
            crate::run::load_embedder(&CpuBackend, &dir, "all-MiniLM-L6-v2"),
            |m: &tabula_models::bert::SentenceEmbedder<CpuBackend>, list: &[String]| {
                Ok::<_, anyhow::Error>(m.tokenize(list)?)
            }
        ),
    }
    Ok(out)
}

/// Sentences per second of `embed` over batches of 32 (after one warm-up batch).
fn embed_rate(
    reps: usize,
    ids: &[Vec<u32>],
    mut embed: impl FnMut(&[Vec<u32>]) -> Result<()>,
) -> Result<f64> {
    embed(&ids[..BATCH.min(ids.len())])?;
    let secs = best_of(reps, || {
        for batch in ids.chunks(BATCH) {
            embed(batch)?;
        }
        Ok(())
    })?;
    Ok(ids.len() as f64 / secs)
}

fn measure_exact<B: ExactBackend>(
    backend: &B,
    name: &str,
    texts: &Texts,
    args: &BenchArgs,
) -> Result<Vec<Measurement>> {
    let dir = crate::models_dir(args.models_dir.clone());
    let mut out = Vec::new();
    if args.only.as_deref().is_none_or(|only| only == "minilm") {
        let mut embedder = crate::run::load_exact_embedder(backend, &dir, "all-MiniLM-L6-v2")?;
        embedder.batch_size = BATCH;
        let tokenize = |list: &[String]| -> Result<Vec<Vec<u32>>> {
            list.iter()
                .map(|t| Ok(embedder.tokenizer.encode(t)?))
                .collect()
        };
        for (task, ids) in minilm_workloads(tokenize, texts)? {
            let rate = embed_rate(args.reps, &ids, |batch| {
                pollster::block_on(embedder.embed_ids(backend, batch))?;
                Ok(())
            })?;
            out.push(record(name, task, "sentences/s", rate));
        }
    }
    for g in generations(args, texts)? {
        let generator = crate::run::load_exact_generator(backend, &dir, g.model)?;
        let model = &generator.model;
        let prompt = &g.prompt;
        let mut prefill = f64::INFINITY;
        let mut decode = f64::INFINITY;
        for _ in 0..args.reps.max(1) {
            let mut cache = model.new_cache(backend, prompt.len() + DECODE_TOKENS + 1)?;
            let start = Instant::now();
            let logits = pollster::block_on(model.step(backend, prompt, 0, &mut cache))?;
            prefill = prefill.min(start.elapsed().as_secs_f64());
            let mut sampler = ExactSampler::greedy();
            let mut token = sampler.pick(&logits, model.frac);
            let start = Instant::now();
            for step in 0..DECODE_TOKENS {
                let logits = pollster::block_on(model.step(
                    backend,
                    &[token],
                    prompt.len() + step,
                    &mut cache,
                ))?;
                token = sampler.pick(&logits, model.frac);
            }
            decode = decode.min(start.elapsed().as_secs_f64());
        }
        out.extend(generation_records(name, &g, prefill, decode));
    }
    Ok(out)
}

fn measure<B: Backend>(
    backend: &B,
    name: &str,
    texts: &Texts,
    args: &BenchArgs,
) -> Result<Vec<Measurement>> {
    let dir = crate::models_dir(args.models_dir.clone());
    let mut out = Vec::new();
    if args.only.as_deref().is_none_or(|only| only == "minilm") {
        let mut embedder = crate::run::load_embedder(backend, &dir, "all-MiniLM-L6-v2")?;
        embedder.batch_size = BATCH;
        for (task, ids) in minilm_workloads(|list| Ok(embedder.tokenize(list)?), texts)? {
            let rate = embed_rate(args.reps, &ids, |batch| {
                pollster::block_on(embedder.embed_ids(backend, batch))?;
                Ok(())
            })?;
            out.push(record(name, task, "sentences/s", rate));
        }
    }
    for g in generations(args, texts)? {
        let generator = crate::run::load_generator(backend, &dir, g.model)?;
        let model = &generator.model;
        let prompt = &g.prompt;
        let mut prefill = f64::INFINITY;
        let mut decode = f64::INFINITY;
        for _ in 0..args.reps.max(1) {
            let mut cache = model.new_cache(backend, prompt.len() + DECODE_TOKENS + 1)?;
            let start = Instant::now();
            let h =
                model.run_layers(backend, model.embed_tokens(backend, prompt, 0)?, &mut cache)?;
            let logits = pollster::block_on(backend.read(&model.head(backend, &h)?))?;
            prefill = prefill.min(start.elapsed().as_secs_f64());
            let mut sampler = Sampler::greedy();
            let mut token = sampler.pick(&logits);
            let start = Instant::now();
            for step in 0..DECODE_TOKENS {
                let h = model.run_layers(
                    backend,
                    model.embed_tokens(backend, &[token], prompt.len() + step)?,
                    &mut cache,
                )?;
                token = sampler.pick(&pollster::block_on(
                    backend.read(&model.head(backend, &h)?),
                )?);
            }
            decode = decode.min(start.elapsed().as_secs_f64());
        }
        out.extend(generation_records(name, &g, prefill, decode));
    }
    Ok(out)
}

/// Prefill and decode rates of one generation model, as table rows.
fn generation_records(name: &str, g: &Generation, prefill: f64, decode: f64) -> [Measurement; 2] {
    [
        record(
            name,
            &format!("{}-prefill-{}", g.task, g.prompt.len()),
            "tokens/s",
            g.prompt.len() as f64 / prefill,
        ),
        record(
            name,
            &format!("{}-decode-{DECODE_TOKENS}", g.task),
            "tokens/s",
            DECODE_TOKENS as f64 / decode,
        ),
    ]
}

fn print_table(ours: &[Measurement], peers: &[Measurement]) {
    println!("| task | ours | value | peer | value | ours / peer |");
    println!("|---|---|---:|---|---:|---:|");
    for m in ours {
        let matching: Vec<&Measurement> = peers.iter().filter(|p| p.task == m.task).collect();
        if matching.is_empty() {
            println!(
                "| {} | {} | {:.1} {} | – | – | – |",
                m.task, m.peer, m.value, m.unit
            );
        }
        for p in matching {
            println!(
                "| {} | {} | {:.1} {} | {} | {:.1} | {:.2}× |",
                m.task,
                m.peer,
                m.value,
                m.unit,
                p.peer,
                p.value,
                m.value / p.value
            );
        }
    }
}
