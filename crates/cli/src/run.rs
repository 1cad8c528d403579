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
    exact::ExactBackend,
    gpu::{AdapterChoice, GpuBackend},
};
use tabula_models::{
    bert::SentenceEmbedder,
    catalog::{self, Family, ModelSpec},
    exact::{ExactEmbedder, ExactEmbedding, ExactFile, ExactGenerator, ExactLlama},
    gguf::GgufFile,
    llama::{Finish, Generator},
    sampling::{ExactSampler, Sampler},
    tokenize::LlamaTokenizer,
};

use crate::{BackendChoice, Precision};

#[derive(Args)]
pub struct EmbedArgs {
    /// Embedding model: from the catalogue, or added with `tabula models add`.
    #[arg(long, default_value = "all-MiniLM-L6-v2")]
    model: String,
    /// Text file with one input per line, or `-` for stdin.
    #[arg(long, default_value = "-")]
    input: String,
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendChoice,
    /// `exact` adds `embedding_q15` (the integer unit vector, scale 2^-15) and its `sha256`,
    /// identical on every backend.
    #[arg(long, value_enum, default_value = "fast")]
    precision: Precision,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Models directory [default: $TABULA_MODELS or ~/.cache/tabula/models]
    #[arg(long)]
    models_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// Decoder model: from the catalogue, or added with `tabula models add`.
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
    /// `exact`: integer-only, with integer sampling: the same tokens (and, with --json, the same
    /// `logits_sha256` per step) on every backend for a given --seed.
    #[arg(long, value_enum, default_value = "fast")]
    precision: Precision,
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

/// A model `embed`, `generate` and `bench` load from the models directory: one of the
/// catalogue, or one `tabula models add` registered.
pub enum LocalModel {
    Catalogue(&'static ModelSpec),
    Added(Box<crate::added::Added>),
}

impl LocalModel {
    /// The model called `name` (catalogue first, then the added ones), which must be of
    /// `family`.
    pub fn find(dir: &std::path::Path, name: &str, family: Family) -> Result<Self> {
        let added = crate::added::registered(dir)?;
        let family_of = |a: &crate::added::Added| match a.family {
            crate::added::AddedFamily::Llama => Family::Llama,
            crate::added::AddedFamily::Bert => Family::Bert,
        };
        let known = || {
            catalog::ALL
                .iter()
                .filter(|m| m.family == family)
                .map(|m| m.name)
                .chain(
                    added
                        .iter()
                        .filter(|a| family_of(a) == family)
                        .map(|a| a.name.as_str()),
                )
                .collect::<Vec<_>>()
                .join(", ")
        };
        let found = match catalog::find(name) {
            Some(spec) => Some((spec.family, LocalModel::Catalogue(spec))),
            None => added
                .iter()
                .find(|a| a.name.eq_ignore_ascii_case(name))
                .map(|a| (family_of(a), LocalModel::Added(Box::new(a.clone())))),
        };
        match found {
            Some((f, model)) if f == family => Ok(model),
            Some(_) => bail!("`{name}` cannot do this; use one of: {}", known()),
            None => bail!(
                "unknown model `{name}`; known: {} (`tabula models add` registers your own)",
                known()
            ),
        }
    }

    /// The bytes of the model's file whose path ends with `suffix`.
    pub fn file(&self, dir: &std::path::Path, suffix: &str) -> Result<Vec<u8>> {
        match self {
            LocalModel::Catalogue(spec) => {
                // That file alone: the others can be large (a BERT's weights next to its
                // tokenizer).
                let f = spec
                    .files
                    .iter()
                    .find(|f| f.local_path.ends_with(suffix))
                    .with_context(|| {
                        format!("the catalogue entry of {} has no `{suffix}`", spec.name)
                    })?;
                read_fetched(dir, f.local_path)
            }
            LocalModel::Added(added) => {
                let (path, _) = added
                    .files(dir)
                    .into_iter()
                    .find(|(path, _)| path.to_string_lossy().ends_with(suffix))
                    .with_context(|| format!("{} has no `{suffix}`", added.name))?;
                std::fs::read(&path).with_context(|| {
                    format!(
                        "cannot read {}: add the model again with `tabula models add`",
                        path.display()
                    )
                })
            }
        }
    }

    /// Its exact-precision file (quantised now if missing) and the SHA-256 in its name.
    pub fn exact_file(&self, dir: &std::path::Path) -> Result<(PathBuf, String)> {
        match self {
            LocalModel::Catalogue(spec) => crate::quantize::exact_file(dir, spec),
            LocalModel::Added(added) => crate::added::exact_file(dir, added),
        }
    }
}

/// Reads the files of a model, pointing at `tabula models fetch` when they are missing.
pub fn model_files(dir: &std::path::Path, spec: &ModelSpec) -> Result<Vec<Vec<u8>>> {
    spec.files
        .iter()
        .map(|f| read_fetched(dir, f.local_path))
        .collect()
}

/// One catalogue file, pointing at `tabula models fetch` when it is missing.
fn read_fetched(dir: &std::path::Path, local_path: &str) -> Result<Vec<u8>> {
    let path = dir.join(local_path);
    std::fs::read(&path).with_context(|| {
        format!(
            "cannot read {}: run `tabula models fetch --dir {}` first",
            path.display(),
            dir.display()
        )
    })
}

/// The bytes of the catalogue file of `spec` whose path ends with `suffix`, out of `files` as
/// [`model_files`] read them.
pub fn file_by_suffix<'a>(
    spec: &ModelSpec,
    files: &'a [Vec<u8>],
    suffix: &str,
) -> Result<&'a [u8]> {
    let i = spec
        .files
        .iter()
        .position(|f| f.local_path.ends_with(suffix))
        .with_context(|| format!("the catalogue entry of {} has no `{suffix}`", spec.name))?;
    Ok(&files[i])
}

pub fn load_embedder<B: Backend>(
    backend: &B,
    dir: &std::path::Path,
    name: &str,
) -> Result<SentenceEmbedder<B>> {
    let model = LocalModel::find(dir, name, Family::Bert)?;
    let file = |suffix| model.file(dir, suffix);
    Ok(SentenceEmbedder::load(
        backend,
        &file("config.json")?,
        &file("model.safetensors")?,
        &file("tokenizer.json")?,
    )?)
}

pub fn load_generator<B: Backend>(
    backend: &B,
    dir: &std::path::Path,
    name: &str,
) -> Result<Generator<B>> {
    let model = LocalModel::find(dir, name, Family::Llama)?;
    Ok(Generator::load(backend, &model.file(dir, ".gguf")?)?)
}

pub fn embed(args: EmbedArgs) -> Result<()> {
    if args.batch_size == 0 || args.batch_size > 1024 {
        bail!("--batch-size must be between 1 and 1024");
    }
    match (args.backend, args.precision) {
        (BackendChoice::Cpu, Precision::Fast) => embed_with(&CpuBackend, &args),
        (BackendChoice::Gpu, Precision::Fast) => embed_with(&gpu_backend()?, &args),
        (BackendChoice::Cpu, Precision::Exact) => embed_exact_with(&CpuBackend, &args),
        (BackendChoice::Gpu, Precision::Exact) => embed_exact_with(&gpu_backend()?, &args),
    }
}

fn embed_with<B: Backend>(backend: &B, args: &EmbedArgs) -> Result<()> {
    let mut embedder = load_embedder(
        backend,
        &crate::models_dir(args.models_dir.clone()),
        &args.model,
    )?;
    embedder.batch_size = args.batch_size;
    embed_lines(args, |chunk| {
        Ok(pollster::block_on(embedder.embed(backend, chunk))?
            .into_iter()
            .map(|e| serde_json::json!({ "tokens": e.input_ids.len(), "embedding": e.vector }))
            .collect())
    })
}

pub fn load_exact_embedder<B: ExactBackend>(
    backend: &B,
    dir: &std::path::Path,
    name: &str,
) -> Result<ExactEmbedder<B>> {
    let model = LocalModel::find(dir, name, Family::Bert)?;
    let (path, hash) = model.exact_file(dir)?;
    let file = ExactFile::open_path(&path, &hash)?;
    let tokenizer = model.file(dir, "tokenizer.json")?;
    Ok(ExactEmbedder::load(backend, &file, &tokenizer)?)
}

/// The JSON fields of one exact embedding.
pub fn exact_embedding_json(e: &ExactEmbedding) -> serde_json::Value {
    serde_json::json!({
        "tokens": e.input_ids.len(),
        "embedding": e.to_f32(),
        "embedding_q15": e.q15,
        "embedding_scale": ExactEmbedding::SCALE,
        "sha256": e.sha256,
    })
}

fn embed_exact_with<B: ExactBackend>(backend: &B, args: &EmbedArgs) -> Result<()> {
    let mut embedder = load_exact_embedder(
        backend,
        &crate::models_dir(args.models_dir.clone()),
        &args.model,
    )?;
    embedder.batch_size = args.batch_size;
    embed_lines(args, |chunk| {
        Ok(pollster::block_on(embedder.embed(backend, chunk))?
            .iter()
            .map(exact_embedding_json)
            .collect())
    })
}

/// Reads the input in chunks of lines, embeds each chunk with `embed_chunk` (one JSON object
/// per line, without its index) and writes JSONL, so inputs of any length stream through in
/// bounded memory.
fn embed_lines(
    args: &EmbedArgs,
    mut embed_chunk: impl FnMut(&[String]) -> Result<Vec<serde_json::Value>>,
) -> Result<()> {
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
            for mut value in embed_chunk(&chunk)? {
                value["index"] = index.into();
                serde_json::to_writer(&mut out, &value)?;
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
    match (args.backend, args.precision) {
        (BackendChoice::Cpu, Precision::Fast) => generate_with(&CpuBackend, &args),
        (BackendChoice::Gpu, Precision::Fast) => generate_with(&gpu_backend()?, &args),
        (BackendChoice::Cpu, Precision::Exact) => generate_exact_with(&CpuBackend, &args),
        (BackendChoice::Gpu, Precision::Exact) => generate_exact_with(&gpu_backend()?, &args),
    }
}

/// Prints generated text as it grows: decodes everything so far and writes what is new,
/// holding back an incomplete UTF-8 sequence (shown as U+FFFD) until its next byte arrives.
struct TextStream<'a> {
    tokenizer: &'a LlamaTokenizer,
    ids: Vec<u32>,
    printed: usize,
}

impl<'a> TextStream<'a> {
    fn new(tokenizer: &'a LlamaTokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            printed: 0,
        }
    }

    fn push(&mut self, token: u32, out: &mut impl Write) {
        self.ids.push(token);
        if let Ok(text) = self.tokenizer.decode(&self.ids)
            && !text.ends_with('\u{FFFD}')
            && text.len() > self.printed
            && text.is_char_boundary(self.printed)
        {
            let _ = out.write_all(&text.as_bytes()[self.printed..]);
            let _ = out.flush();
            self.printed = text.len();
        }
    }
}

fn finish_reason(finish: Finish) -> &'static str {
    match finish {
        Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

pub fn load_exact_generator<B: ExactBackend>(
    backend: &B,
    dir: &std::path::Path,
    name: &str,
) -> Result<ExactGenerator<B>> {
    let model = LocalModel::find(dir, name, Family::Llama)?;
    let (path, hash) = model.exact_file(dir)?;
    let file = ExactFile::open_path(&path, &hash)?;
    // The GGUF is read for its tokenizer only, and dropped before the model loads.
    let tokenizer = {
        let gguf = model.file(dir, ".gguf")?;
        LlamaTokenizer::from_gguf(&GgufFile::parse(&gguf)?)?
    };
    Ok(ExactGenerator::new(
        ExactLlama::load(backend, &file)?,
        tokenizer,
    )?)
}

fn generate_exact_with<B: ExactBackend>(backend: &B, args: &GenerateArgs) -> Result<()> {
    let generator = load_exact_generator(
        backend,
        &crate::models_dir(args.models_dir.clone()),
        &args.model,
    )?;
    let prompt = generator.prompt_ids(&args.prompt, args.chat)?;
    let mut sampler = ExactSampler::new(args.temperature, args.top_p, args.seed);
    let mut stdout = std::io::stdout().lock();
    let mut stream = TextStream::new(&generator.tokenizer);
    let (steps, finish) = pollster::block_on(generator.generate(
        backend,
        &prompt,
        args.max_tokens,
        &mut sampler,
        |token| {
            if !args.json {
                stream.push(token, &mut std::io::stdout().lock());
            }
        },
    ))?;
    if args.json {
        let ids: Vec<u32> = steps.iter().map(|s| s.token).collect();
        let hashes: Vec<&str> = steps.iter().map(|s| s.logits_sha256.as_str()).collect();
        let text = generator.tokenizer.decode(&ids)?;
        serde_json::to_writer(
            &mut stdout,
            &serde_json::json!({
                "model": args.model, "precision": "exact", "prompt_ids": prompt, "ids": ids,
                "text": text, "finish_reason": finish_reason(finish), "logits_sha256": hashes,
            }),
        )?;
    }
    writeln!(stdout)?;
    Ok(())
}

fn generate_with<B: Backend>(backend: &B, args: &GenerateArgs) -> Result<()> {
    let generator = load_generator(
        backend,
        &crate::models_dir(args.models_dir.clone()),
        &args.model,
    )?;
    let prompt = generator.prompt_ids(&args.prompt, args.chat)?;
    let mut sampler = Sampler::new(args.temperature, args.top_p, args.seed);
    let mut stream = TextStream::new(&generator.tokenizer);
    let (generated, finish) = pollster::block_on(generator.generate(
        backend,
        &prompt,
        args.max_tokens,
        &mut sampler,
        |token| {
            if !args.json {
                stream.push(token, &mut std::io::stdout().lock());
            }
        },
    ))?;
    let finish = finish_reason(finish);
    let mut stdout = std::io::stdout().lock();
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
