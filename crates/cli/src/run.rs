//! `tabula embed` and `tabula generate`.

use std::{
    io::{BufRead, BufWriter, Write},
    path::PathBuf,
};

use anyhow::{Context, Result, bail};
use clap::Args;
use tabula_engine::{
    Backend,
    cpu::CpuBackend,
    gpu::{AdapterChoice, GpuBackend},
};
use tabula_models::{
    bert::SentenceEmbedder,
    catalog::{self, Family, ModelSpec},
    llama::{Finish, Generator},
    sampling::Sampler,
};

use crate::BackendChoice;

#[derive(Args)]
pub struct EmbedArgs {
    /// Embedding model.
    #[arg(long, default_value = "all-MiniLM-L6-v2")]
    model: String,
    /// Text file with one input per line, or `-` for stdin.
    #[arg(long, default_value = "-")]
    input: String,
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendChoice,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Models directory [default: $TABULA_MODELS or ~/.cache/tabula/models]
    #[arg(long)]
    models_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// Decoder model.
    #[arg(long, default_value = "SmolLM2-135M-Instruct")]
    model: String,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template as one user message.
    #[arg(long)]
    chat: bool,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 picks the most likely token (greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Random seed for sampling; the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendChoice,
    /// Print one JSON object (prompt and generated token ids, text, finish reason) instead of
    /// streaming text.
    #[arg(long)]
    json: bool,
    /// Models directory [default: $TABULA_MODELS or ~/.cache/tabula/models]
    #[arg(long)]
    models_dir: Option<PathBuf>,
}

pub fn gpu_backend() -> Result<GpuBackend> {
    let gpu = pollster::block_on(GpuBackend::new(AdapterChoice::Any))?;
    tracing::info!("using {}", gpu.describe());
    Ok(gpu)
}

fn spec(name: &str, family: Family) -> Result<&'static ModelSpec> {
    let known = || {
        catalog::ALL
            .iter()
            .filter(|m| m.family == family)
            .map(|m| m.name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    match catalog::find(name) {
        Some(s) if s.family == family => Ok(s),
        Some(_) => bail!("`{name}` cannot do this; use one of: {}", known()),
        None => bail!("unknown model `{name}`; known: {}", known()),
    }
}

/// Reads the files of a model, pointing at `tabula models fetch` when they are missing.
pub fn model_files(dir: &std::path::Path, spec: &ModelSpec) -> Result<Vec<Vec<u8>>> {
    spec.files
        .iter()
        .map(|f| {
            let path = dir.join(f.local_path);
            std::fs::read(&path).with_context(|| {
                format!(
                    "cannot read {}: run `tabula models fetch --dir {}` first",
                    path.display(),
                    dir.display()
                )
            })
        })
        .collect()
}

pub fn load_embedder<B: Backend>(
    backend: &B,
    dir: &std::path::Path,
    name: &str,
) -> Result<SentenceEmbedder<B>> {
    let spec = spec(name, Family::Bert)?;
    let files = model_files(dir, spec)?;
    let file = |suffix: &str| -> Result<&[u8]> {
        let i = spec
            .files
            .iter()
            .position(|f| f.local_path.ends_with(suffix))
            .context("catalogue entry lacks a file")?;
        Ok(&files[i])
    };
    Ok(SentenceEmbedder::load(
        backend,
        file("config.json")?,
        file("model.safetensors")?,
        file("tokenizer.json")?,
    )?)
}

pub fn load_generator<B: Backend>(
    backend: &B,
    dir: &std::path::Path,
    name: &str,
) -> Result<Generator<B>> {
    let spec = spec(name, Family::Llama)?;
    let files = model_files(dir, spec)?;
    Ok(Generator::load(backend, &files[0])?)
}

pub fn embed(args: EmbedArgs) -> Result<()> {
    if args.batch_size == 0 || args.batch_size > 1024 {
        bail!("--batch-size must be between 1 and 1024");
    }
    match args.backend {
        BackendChoice::Cpu => embed_with(&CpuBackend, &args),
        BackendChoice::Gpu => embed_with(&gpu_backend()?, &args),
    }
}

/// Lines are read and embedded in chunks, so inputs of any length stream through in bounded
/// memory.
fn embed_with<B: Backend>(backend: &B, args: &EmbedArgs) -> Result<()> {
    let mut embedder = load_embedder(
        backend,
        &crate::models_dir(args.models_dir.clone()),
        &args.model,
    )?;
    embedder.batch_size = args.batch_size;
    let reader: Box<dyn BufRead> = if args.input == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(&args.input)
                .with_context(|| format!("cannot open --input {}", args.input))?,
        ))
    };
    let mut out = BufWriter::new(std::io::stdout().lock());
    let spinner = indicatif::ProgressBar::new_spinner().with_message("embedding");
    let mut index = 0usize;
    let mut chunk: Vec<String> = Vec::new();
    let mut reader = reader;
    let mut line_no = 0usize;
    loop {
        let line = read_line(&mut reader, line_no + 1)?;
        let done = line.is_none();
        if let Some(line) = line {
            line_no += 1;
            chunk.push(line);
        }
        if chunk.len() >= args.batch_size * 8 || (done && !chunk.is_empty()) {
            for e in pollster::block_on(embedder.embed(backend, &chunk))? {
                serde_json::to_writer(
                    &mut out,
                    &serde_json::json!({ "index": index, "tokens": e.input_ids.len(), "embedding": e.vector }),
                )?;
                out.write_all(b"\n")?;
                index += 1;
            }
            out.flush()?;
            chunk.clear();
            spinner.set_message(format!("{index} texts embedded"));
        }
        if done {
            break;
        }
    }
    spinner.finish_and_clear();
    Ok(())
}

/// Longest input line `embed` accepts. Only the first 256 tokens of a text are embedded, so
/// this bounds memory, not what can be embedded.
const MAX_LINE_BYTES: usize = 1 << 20;

/// One line without its `\n` / `\r\n`, or `None` at the end of the input.
fn read_line(reader: &mut impl BufRead, line_no: usize) -> Result<Option<String>> {
    let mut buf = Vec::new();
    let n = std::io::Read::take(reader, MAX_LINE_BYTES as u64 + 1)
        .read_until(b'\n', &mut buf)
        .with_context(|| format!("reading line {line_no} of the input"))?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    } else if buf.len() > MAX_LINE_BYTES {
        bail!(
            "line {line_no} of the input is longer than 1 MiB; split it (only its first 256 tokens would be embedded)"
        );
    }
    String::from_utf8(buf)
        .map(Some)
        .with_context(|| format!("line {line_no} of the input is not valid UTF-8"))
}

pub fn generate(args: GenerateArgs) -> Result<()> {
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        bail!("--temperature must be a finite number >= 0");
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1]");
    }
    match args.backend {
        BackendChoice::Cpu => generate_with(&CpuBackend, &args),
        BackendChoice::Gpu => generate_with(&gpu_backend()?, &args),
    }
}

fn generate_with<B: Backend>(backend: &B, args: &GenerateArgs) -> Result<()> {
    let generator = load_generator(
        backend,
        &crate::models_dir(args.models_dir.clone()),
        &args.model,
    )?;
    let prompt = generator.prompt_ids(&args.prompt, args.chat)?;
    let mut sampler = Sampler::new(args.temperature, args.top_p, args.seed);
    let mut stdout = std::io::stdout().lock();
    let mut ids = Vec::new();
    let mut printed = 0usize;
    let (generated, finish) = pollster::block_on(generator.generate(
        backend,
        &prompt,
        args.max_tokens,
        &mut sampler,
        |token| {
            if args.json {
                return;
            }
            // Decode everything so far and print what is new, holding back an incomplete UTF-8
            // sequence (shown as U+FFFD) until its next byte arrives.
            ids.push(token);
            if let Ok(text) = generator.tokenizer.decode(&ids)
                && !text.ends_with('\u{FFFD}')
                && text.len() > printed
                && text.is_char_boundary(printed)
            {
                let _ = stdout.write_all(&text.as_bytes()[printed..]);
                let _ = stdout.flush();
                printed = text.len();
            }
        },
    ))?;
    let finish = match finish {
        Finish::Stop => "stop",
        Finish::Length => "length",
    };
    if args.json {
        let text = generator.tokenizer.decode(&generated)?;
        serde_json::to_writer(
            &mut stdout,
            &serde_json::json!({
                "model": args.model, "prompt_ids": prompt, "ids": generated, "text": text, "finish_reason": finish,
            }),
        )?;
    }
    writeln!(stdout)?;
    Ok(())
}
