//! `tabula bench`: our throughput next to the peers (onnxruntime, PyTorch), in one run, on the
//! same inputs. The peers run from `bench/peers.py` in a Python environment of the user's
//! choosing; it writes the exact texts it measured, and we measure those same texts.

use std::{path::PathBuf, process::Command, time::Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::{Deserialize, Serialize};
use tabula_engine::{Backend, cpu::CpuBackend};
use tabula_models::sampling::Sampler;

use crate::BackendChoice;

#[derive(Args)]
pub struct BenchArgs {
    /// Python interpreter with the peers' packages (torch, onnxruntime, transformers, gguf);
    /// without it only our numbers are measured, on texts from --texts.
    #[arg(long, env = "TABULA_BENCH_PYTHON")]
    peers_python: Option<PathBuf>,
    /// The peers' script.
    #[arg(long, default_value = "bench/peers.py")]
    peers_script: PathBuf,
    /// Threads for the peers (our CPU backend is single-threaded).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Benchmark texts (JSON written by `peers.py --texts-out`), when the peers are not run.
    #[arg(long)]
    texts: Option<PathBuf>,
    /// Our backends to measure.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "cpu,gpu")]
    backends: Vec<BackendChoice>,
    /// Only one model.
    #[arg(long, value_parser = ["minilm", "smollm2"])]
    only: Option<String>,
    /// Repetitions; the best is reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Write all results as JSON here.
    #[arg(long)]
    json_out: Option<PathBuf>,
    #[arg(long)]
    models_dir: Option<PathBuf>,
}

#[derive(Deserialize)]
struct Texts {
    short: Vec<String>,
    long: Vec<String>,
    prompt_ids: Vec<u32>,
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
        match backend {
            BackendChoice::Cpu => ours.extend(measure(&CpuBackend, "tabula-cpu", &texts, &args)?),
            BackendChoice::Gpu => {
                let gpu = crate::run::gpu_backend()?;
                let name = format!("tabula-gpu ({})", gpu.describe());
                ours.extend(measure(&gpu, &name, &texts, &args)?);
            }
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

fn measure<B: Backend>(
    backend: &B,
    name: &str,
    texts: &Texts,
    args: &BenchArgs,
) -> Result<Vec<Measurement>> {
    let dir = crate::models_dir(args.models_dir.clone());
    let mut out = Vec::new();
    let record = |task: &str, unit: &str, value: f64| {
        eprintln!("{name:40} {task:22} {value:10.1} {unit}");
        Measurement {
            peer: name.to_string(),
            task: task.to_string(),
            unit: unit.to_string(),
            value,
        }
    };
    if args.only.as_deref() != Some("smollm2") {
        let mut embedder = crate::run::load_embedder(backend, &dir, "all-MiniLM-L6-v2")?;
        embedder.batch_size = BATCH;
        for (task, list, cut) in [
            ("minilm-short-b32", &texts.short, None),
            ("minilm-long-b32", &texts.long, Some(128)),
        ] {
            // Tokenisation is outside the timing, as for the peers; long texts are cut to 128
            // tokens keeping [SEP], as the peers' tokenizer does.
            let mut ids = embedder.tokenize(list)?;
            if let Some(cut) = cut {
                for seq in &mut ids {
                    if seq.len() > cut {
                        let sep = *seq.last().unwrap_or(&0);
                        seq.truncate(cut - 1);
                        seq.push(sep);
                    }
                }
            }
            pollster::block_on(embedder.embed_ids(backend, &ids[..BATCH.min(ids.len())]))?; // warm-up
            let secs = best_of(args.reps, || {
                for batch in ids.chunks(BATCH) {
                    pollster::block_on(embedder.embed_ids(backend, batch))?;
                }
                Ok(())
            })?;
            out.push(record(task, "sentences/s", ids.len() as f64 / secs));
        }
    }
    if args.only.as_deref() != Some("minilm") {
        let generator = crate::run::load_generator(backend, &dir, "SmolLM2-135M-Instruct")?;
        let model = &generator.model;
        let prompt = &texts.prompt_ids;
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
        out.push(record(
            &format!("smollm2-prefill-{}", prompt.len()),
            "tokens/s",
            prompt.len() as f64 / prefill,
        ));
        out.push(record(
            &format!("smollm2-decode-{DECODE_TOKENS}"),
            "tokens/s",
            DECODE_TOKENS as f64 / decode,
        ));
    }
    Ok(out)
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
