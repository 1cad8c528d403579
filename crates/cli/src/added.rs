//! `tabula models add`: a model file of the user's own, checked and registered in the models
//! directory by its SHA-256 (`added/<sha256>.gguf`, listed in `added/models.json`). A refused
//! file leaves the directory as it was: the file is checked before anything is written, copied
//! to a temporary name and renamed, and the list is replaced the same way.

use std::{
    fs,
    io::{Read, Write},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tabula_models::{
    catalog,
    gguf::GgufFile,
    llama::{self, GgufSummary},
};

/// The largest file `models add` reads (it holds the file in memory to check it).
const MAX_ADD_BYTES: u64 = 16 << 30;
/// The longest model name.
const MAX_NAME: usize = 64;

/// One registered model.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Added {
    pub name: String,
    /// Relative to the models directory.
    pub file: String,
    pub sha256: String,
    pub size: u64,
    pub summary: GgufSummary,
}

fn registry_path(dir: &Path) -> PathBuf {
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

/// Checks `path` and registers it as `name` (default: the file's stem).
pub fn add(dir: &Path, path: &Path, name: Option<&str>) -> Result<()> {
    let meta = fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.is_dir() {
        bail!(
            "{} is a directory: `models add` takes a GGUF file here (Hugging Face directories are \
             not supported yet)",
            path.display()
        );
    }
    if meta.len() > MAX_ADD_BYTES {
        bail!(
            "{} is {} bytes; at most {MAX_ADD_BYTES} are read",
            path.display(),
            meta.len()
        );
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .with_context(|| format!("cannot read {}", path.display()))?;
    let gguf = GgufFile::parse(&bytes)
        .with_context(|| format!("{} is not a GGUF file this reader accepts", path.display()))?;
    let summary =
        llama::inspect(&gguf).with_context(|| format!("{} cannot be served", path.display()))?;
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    let name = name.unwrap_or(stem).to_string();
    check_name(&name)?;
    if catalog::ALL.iter().any(|m| m.name == name) {
        bail!(
            "`{name}` is a model of the catalogue (`tabula models fetch`); choose another name with --name"
        );
    }
    let sha256 = catalog::sha256_hex(&bytes);
    let mut list = registered(dir)?;
    if let Some(other) = list.iter().find(|a| a.name == name) {
        if other.sha256 == sha256 {
            println!("{name} is already added ({sha256})");
            return Ok(());
        }
        bail!(
            "another file is already added as `{name}` ({}); choose another name with --name",
            other.sha256
        );
    }
    let added = dir.join("added");
    fs::create_dir_all(&added).with_context(|| format!("cannot create {}", added.display()))?;
    let file = format!("added/{sha256}.gguf");
    write_atomically(&dir.join(&file), &bytes)?;
    list.push(Added {
        name: name.clone(),
        file,
        sha256: sha256.clone(),
        size: bytes.len() as u64,
        summary,
    });
    write_atomically(&registry_path(dir), &serde_json::to_vec_pretty(&list)?)?;
    let a = list.last().expect("just pushed");
    println!("added {name}: {}", describe(a));
    Ok(())
}

/// Writes `bytes` to a temporary name next to `path`, then renames it into place.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("partial.{}", std::process::id()));
    let written = fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()))
        .and_then(|_| fs::rename(&tmp, path));
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
    let s = &a.summary;
    format!(
        "{} ({} layers), {:.1} M parameters, file {}, memory {} fast / about {} exact, sha256 {}",
        s.architecture,
        s.layers,
        s.parameters as f64 / 1e6,
        mb(a.size),
        mb(s.fast_bytes),
        mb(s.exact_bytes),
        a.sha256
    )
}

/// The exact-precision file of an added model, `added/<name>.exact.<sha256>.safetensors`,
/// quantised now when missing (older quantised files of it are removed).
pub fn exact_file(dir: &Path, added: &Added) -> Result<(PathBuf, String)> {
    use tabula_models::exact::{exact_file_name, hash_in_name, quantize_llama};
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
    let (exact, hash) = quantize_llama(&added.name, &bytes)?;
    let path = folder.join(exact_file_name(&added.name, &hash));
    write_atomically(&path, &exact)?;
    for (old, _) in found {
        if old != path {
            let _ = fs::remove_file(old);
        }
    }
    Ok((path, hash))
}
