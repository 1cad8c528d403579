//! `tabula models add`: a model of the user's own, checked and registered in the models
//! directory by the SHA-256 of its weights, listed in `added/models.json`: a Llama-family GGUF
//! file (`added/<sha256>.gguf`), or a Hugging Face BERT directory (`added/<sha256>/` with
//! `config.json`, `model.safetensors`, `tokenizer.json`; the config carries the pooling and
//! normalisation of its sentence-transformers modules). A refused model leaves the directory
//! as it was: everything is checked before anything is written, written under a temporary name
//! and renamed, and the list is replaced the same way.

use std::{
    fs,
    io::{Read, Write},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tabula_models::{ModelSummary, bert, catalog, gguf::GgufFile, llama, tokenize::BertTokenizer};

/// The largest file `models add` reads (it holds the file in memory to check it).
const MAX_ADD_BYTES: u64 = 16 << 30;
/// The longest model name.
const MAX_NAME: usize = 64;

/// The families `models add` takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddedFamily {
    /// A GGUF file.
    #[default]
    Llama,
    /// A Hugging Face directory.
    Bert,
}

/// One registered model.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Added {
    pub name: String,
    #[serde(default)]
    pub family: AddedFamily,
    /// The weights file (GGUF, or `model.safetensors`), relative to the models directory.
    pub file: String,
    /// The weights file's SHA-256: the model's identity.
    pub sha256: String,
    pub size: u64,
    /// The model's other files (a BERT directory's `config.json` and `tokenizer.json`):
    /// path relative to the models directory, and SHA-256.
    #[serde(default)]
    pub others: Vec<(String, String)>,
    pub summary: ModelSummary,
}

impl Added {
    /// Every file of the model (weights first): absolute path and SHA-256.
    pub fn files(&self, dir: &Path) -> Vec<(PathBuf, String)> {
        std::iter::once((self.file.as_str(), self.sha256.as_str()))
            .chain(self.others.iter().map(|(f, h)| (f.as_str(), h.as_str())))
            .map(|(f, h)| (dir.join(f), h.to_string()))
            .collect()
    }
}

/// The files of a BERT directory `models add` reads, and the most bytes of each.
const BERT_WEIGHTS: &str = "model.safetensors";
const MAX_SIDE_FILE: u64 = 64 << 20;
/// The index of a checkpoint saved in shards (`save_pretrained` with `max_shard_size`).
const SHARD_INDEX: &str = "model.safetensors.index.json";

pub fn registry_path(dir: &Path) -> PathBuf {
    dir.join("added").join("models.json")
}

/// The models added so far (none when the list does not exist).
pub fn registered(dir: &Path) -> Result<Vec<Added>> {
    let path = registry_path(dir);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is damaged; remove it and add the models again",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// A name a requester can type: letters, digits, `.`, `_` and `-`, at most 64.
fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > MAX_NAME
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        bail!(
            "`{name}` is not a usable model name: use 1 to {MAX_NAME} letters, digits, `.`, `_` or `-` \
             (choose one with --name)"
        );
    }
    Ok(())
}

/// Reads the file at `path`, at most `max` bytes (`None` when it does not exist).
fn read_bounded(path: &Path, max: u64) -> Result<Option<Vec<u8>>> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    if !meta.is_file() {
        bail!("{} is not a file", path.display());
    }
    if meta.len() > max {
        bail!(
            "{} is {} bytes; at most {max} are read",
            path.display(),
            meta.len()
        );
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    fs::File::open(path)
        .and_then(|f| f.take(max).read_to_end(&mut bytes))
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Some(bytes))
}

/// Checks `path` (a GGUF file or a Hugging Face BERT directory) and registers it as `name`
/// (default: the file's stem, or the directory's name).
pub fn add(dir: &Path, path: &Path, name: Option<&str>) -> Result<()> {
    let meta = fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.is_dir() {
        return add_bert(dir, path, name);
    }
    let bytes = read_bounded(path, MAX_ADD_BYTES)?
        .with_context(|| format!("cannot read {}", path.display()))?;
    let gguf = GgufFile::parse(&bytes)
        .with_context(|| format!("{} is not a GGUF file this reader accepts", path.display()))?;
    let summary = llama::inspect(&gguf, &bytes)
        .with_context(|| format!("{} cannot be served", path.display()))?;
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    let name = name.unwrap_or(stem).to_string();
    let sha256 = catalog::sha256_hex(&bytes);
    let file = format!("added/{sha256}.gguf");
    let Some(mut list) = free_name(dir, &name, &file)? else {
        return Ok(());
    };
    let added = dir.join("added");
    fs::create_dir_all(&added).with_context(|| format!("cannot create {}", added.display()))?;
    write_atomically(&dir.join(&file), &bytes)?;
    list.push(Added {
        name,
        family: AddedFamily::Llama,
        file,
        sha256,
        size: bytes.len() as u64,
        others: Vec::new(),
        summary,
    });
    register(dir, list)
}

/// The registered list, when `name` is free for the model whose weights will be `file` (a
/// path named by its content): a usable name, not the catalogue's, not another model's.
/// `None` when this very model is already added as `name`.
fn free_name(dir: &Path, name: &str, file: &str) -> Result<Option<Vec<Added>>> {
    check_name(name)?;
    if catalog::ALL
        .iter()
        .any(|m| m.name.eq_ignore_ascii_case(name))
    {
        bail!(
            "`{name}` is a model of the catalogue (`tabula models fetch`); choose another name with --name"
        );
    }
    let list = registered(dir)?;
    if let Some(other) = list.iter().find(|a| a.name.eq_ignore_ascii_case(name)) {
        if other.file == file {
            println!("{name} is already added ({})", other.sha256);
            return Ok(None);
        }
        bail!(
            "another model is already added as `{name}` ({}); choose another name with --name",
            other.sha256
        );
    }
    Ok(Some(list))
}

/// Writes `list` (whose last entry is the model just added) as the registry.
fn register(dir: &Path, list: Vec<Added>) -> Result<()> {
    write_atomically(&registry_path(dir), &serde_json::to_vec_pretty(&list)?)?;
    let a = list.last().expect("the caller just pushed one");
    println!("added {}: {}", a.name, describe(a));
    Ok(())
}

/// Checks a Hugging Face BERT directory and registers it: `config.json` of `model_type`
/// `bert`, one `model.safetensors` holding every tensor with its shape (or shards and their
/// index, merged into one), a `tokenizer.json`
/// whose ids fit the vocabulary, and the sentence-transformers modules (pooling, normalise).
/// The registered `config.json` is the model's with the modules' settings written in (keys
/// `tabula_*`), so a worker needs no other file.
fn add_bert(dir: &Path, path: &Path, name: Option<&str>) -> Result<()> {
    let at = |file: &str| path.join(file);
    let side = |file: &str| read_bounded(&at(file), MAX_SIDE_FILE);
    let Some(config_bytes) = side("config.json")? else {
        let gguf = fs::read_dir(path)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".gguf"));
        bail!(
            "{} has no config.json: `models add` takes a GGUF file, or a Hugging Face BERT \
             directory (config.json, model.safetensors, tokenizer.json){}",
            path.display(),
            if gguf {
                "; to add the GGUF file in it, name the file"
            } else {
                ""
            }
        );
    };
    let weights = match read_bounded(&at(BERT_WEIGHTS), MAX_ADD_BYTES)? {
        Some(weights) => weights,
        // Saved in shards: merged into one file, every tensor where the index says.
        None if at(SHARD_INDEX).exists() => {
            let index = side(SHARD_INDEX)?.unwrap_or_default();
            let mut left = MAX_ADD_BYTES;
            let mut read = |shard: &str| {
                let bytes = read_bounded(&at(shard), left)
                    .map_err(|e| tabula_models::ModelError::Format(format!("{e:#}")))?
                    .ok_or_else(|| {
                        tabula_models::ModelError::Format(format!(
                            "the index names the shard {shard}, which is not there"
                        ))
                    })?;
                left -= bytes.len() as u64;
                Ok(bytes)
            };
            tabula_models::merge_shards(&index, &mut read).with_context(|| {
                format!("{} cannot be served: its sharded weights", path.display())
            })?
        }
        None => {
            let hint = if at("pytorch_model.bin").exists() {
                "it holds pytorch_model.bin: save the model with safetensors \
                 (`model.save_pretrained(dir, safe_serialization=True)`)"
            } else {
                "the weights must be in model.safetensors, or in shards listed by \
                 model.safetensors.index.json"
            };
            bail!("{} has no {BERT_WEIGHTS}: {hint}", path.display());
        }
    };
    let Some(tokenizer) = side("tokenizer.json")? else {
        bail!(
            "{} has no tokenizer.json: save the tokenizer with a fast tokenizer \
             (`AutoTokenizer.from_pretrained(...).save_pretrained(dir)`)",
            path.display()
        );
    };
    let fail = |what: &str| format!("{} cannot be served: {what}", path.display());
    let modules = bert::sentence_modules(&|file: &str| {
        side(file).map_err(|e| tabula_models::ModelError::Format(format!("{e:#}")))
    })
    .with_context(|| fail("its sentence-transformers modules"))?;
    let (config_bytes, parsed) = bert::registered_config(&config_bytes, &modules, &weights)
        .with_context(|| fail("config.json"))?;
    let summary = bert::inspect(&parsed, &weights).with_context(|| fail(BERT_WEIGHTS))?;
    let tok = BertTokenizer::from_json(&tokenizer, parsed.max_tokens())
        .with_context(|| fail("tokenizer.json"))?;
    if tok.vocab_size() > parsed.vocab_size {
        bail!(
            "{}: the tokenizer has {} tokens but the model embeds {} (vocab_size): they are not \
             one model's",
            path.display(),
            tok.vocab_size(),
            parsed.vocab_size
        );
    }
    let dir_name = path
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let name = name.unwrap_or(&dir_name).to_string();
    let sha256 = catalog::sha256_hex(&weights);
    let files = [
        (BERT_WEIGHTS, &weights),
        ("config.json", &config_bytes),
        ("tokenizer.json", &tokenizer),
    ];
    // The folder is named by its whole content (the three files' hashes), so a folder that
    // exists already holds exactly these files.
    let hashes: Vec<String> = files.iter().map(|(_, b)| catalog::sha256_hex(b)).collect();
    let folder = format!(
        "added/{}",
        catalog::sha256_hex(hashes.join("\n").as_bytes())
    );
    let Some(mut list) = free_name(dir, &name, &format!("{folder}/{BERT_WEIGHTS}"))? else {
        return Ok(());
    };
    let tmp = dir.join(format!("{folder}.partial.{}", std::process::id()));
    let target = dir.join(&folder);
    let written = if target.is_dir() {
        Ok(())
    } else {
        fs::create_dir_all(&tmp)
            .and_then(|_| {
                files
                    .iter()
                    .try_for_each(|(file, bytes)| write_synced(&tmp.join(file), bytes))
            })
            .and_then(|_| fs::rename(&tmp, &target))
    };
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", dir.join(&folder).display()));
    }
    list.push(Added {
        name,
        family: AddedFamily::Bert,
        file: format!("{folder}/{BERT_WEIGHTS}"),
        sha256,
        size: weights.len() as u64,
        others: files[1..]
            .iter()
            .zip(&hashes[1..])
            .map(|((file, _), hash)| (format!("{folder}/{file}"), hash.clone()))
            .collect(),
        summary,
    });
    register(dir, list)
}

/// Writes `bytes` to `path` and syncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    fs::File::create(path).and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()))
}

/// Writes `bytes` to a temporary name next to `path`, then renames it into place.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("partial.{}", std::process::id()));
    let written = write_synced(&tmp, bytes).and_then(|_| fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// One line: family, parameters, file size, memory in each precision, SHA-256.
pub fn describe(a: &Added) -> String {
    summary_line(&a.summary, a.size, &a.sha256)
}

/// What `describe` says of a model with this summary, weights file size and SHA-256.
pub fn summary_line(s: &ModelSummary, size: u64, sha256: &str) -> String {
    format!(
        "{} ({} layers), {:.1} M parameters, file {}, memory {} fast / about {} exact, sha256 {}",
        s.architecture,
        s.layers,
        s.parameters as f64 / 1e6,
        mb(size),
        mb(s.fast_bytes),
        mb(s.exact_bytes),
        sha256
    )
}

/// The exact-precision file of an added model, `added/<name>.exact.<sha256>.safetensors`,
/// quantised now when missing (older quantised files of it are removed).
pub fn exact_file(dir: &Path, added: &Added) -> Result<(PathBuf, String)> {
    use tabula_models::exact::{exact_file_name, hash_in_name, quantize_bert, quantize_llama};
    let folder = dir.join("added");
    let mut found = Vec::new();
    for entry in
        fs::read_dir(&folder).with_context(|| format!("cannot list {}", folder.display()))?
    {
        let entry = entry?;
        if let Some(hash) = entry
            .file_name()
            .to_str()
            .and_then(|n| hash_in_name(&added.name, n))
        {
            found.push((entry.path(), hash.to_string()));
        }
    }
    if let [one] = found.as_slice() {
        return Ok(one.clone());
    }
    eprintln!(
        "quantising {} to int8 for exact precision (once)",
        added.name
    );
    let source = dir.join(&added.file);
    let bytes = fs::read(&source).with_context(|| format!("cannot read {}", source.display()))?;
    if catalog::sha256_hex(&bytes) != added.sha256 {
        bail!(
            "{} does not hash to {}: add the model again",
            source.display(),
            added.sha256
        );
    }
    let (exact, hash) = match added.family {
        AddedFamily::Llama => quantize_llama(&added.name, &bytes)?,
        AddedFamily::Bert => {
            let (config, _) = added
                .others
                .iter()
                .find(|(f, _)| f.ends_with("/config.json"))
                .context("the registry lists no config.json for it: add the model again")?;
            let config = fs::read(dir.join(config))
                .with_context(|| format!("cannot read {config}: add the model again"))?;
            quantize_bert(&added.name, &config, &bytes)?
        }
    };
    let path = folder.join(exact_file_name(&added.name, &hash));
    write_atomically(&path, &exact)?;
    for (old, _) in found {
        if old != path {
            let _ = fs::remove_file(old);
        }
    }
    Ok((path, hash))
}
