//! `tabula models quantize`: writes the content-addressed exact-precision file of a model, and
//! finds (or makes) it for `--precision exact`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use tabula_models::{
    catalog::{self, Family, ModelSpec},
    exact::{exact_file_name, hash_in_name, quantize_bert, quantize_llama},
};

use crate::run::{file_by_suffix, model_files};

/// The quantised files of `spec` present in `dir`, with the hashes in their names.
pub fn present(dir: &Path, spec: &ModelSpec) -> Result<Vec<(PathBuf, String)>> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if let Some(hash) = name.to_str().and_then(|n| hash_in_name(spec.name, n)) {
            found.push((entry.path(), hash.to_string()));
        }
    }
    found.sort();
    Ok(found)
}

/// Quantises `spec` from its source files into `dir`, replacing older quantised files of it.
/// Returns the new file's path and hash.
pub fn quantize_one(dir: &Path, spec: &ModelSpec) -> Result<(PathBuf, String)> {
    let files = model_files(dir, spec)?;
    for (f, bytes) in spec.files.iter().zip(&files) {
        if catalog::sha256_hex(bytes) != f.sha256 {
            bail!(
                "{} does not match its checksum; run `tabula models fetch --dir {}` again",
                dir.join(f.local_path).display(),
                dir.display()
            );
        }
    }
    let spinner = indicatif::ProgressBar::new_spinner()
        .with_message(format!("quantising {} to int8", spec.name));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let file = |suffix| file_by_suffix(spec, &files, suffix);
    let (bytes, hash) = match spec.family {
        Family::Bert => quantize_bert(spec.name, file("config.json")?, file("model.safetensors")?)?,
        Family::Llama => quantize_llama(spec.name, file(".gguf")?)?,
    };
    let path = dir.join(exact_file_name(spec.name, &hash));
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, &bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    for (old, old_hash) in present(dir, spec)? {
        if old_hash != hash {
            std::fs::remove_file(&old)
                .with_context(|| format!("cannot remove stale {}", old.display()))?;
        }
    }
    spinner.finish_and_clear();
    Ok((path, hash))
}

/// `tabula models quantize`.
pub fn quantize(dir: &Path, only: Option<&str>) -> Result<()> {
    for spec in crate::fetch::selected_models(only)? {
        let started = std::time::Instant::now();
        let (path, _) = quantize_one(dir, spec)?;
        let size = std::fs::metadata(&path)?.len();
        println!(
            "{}: {} ({:.1} MB, {:.1} s)",
            spec.name,
            path.display(),
            size as f64 / 1e6,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// The path and hash of `spec`'s quantised file, quantising it first if there is none.
/// [`ExactFile::open_path`](tabula_models::exact::ExactFile::open_path) loads it a tensor at
/// a time.
pub fn exact_file(dir: &Path, spec: &ModelSpec) -> Result<(PathBuf, String)> {
    let found = present(dir, spec)?;
    let (path, hash) = match found.len() {
        0 => {
            eprintln!(
                "no exact-precision file for {} yet: quantising it now (once; `tabula models quantize` does the same)",
                spec.name
            );
            quantize_one(dir, spec)?
        }
        1 => found.into_iter().next().expect("one entry"),
        _ => bail!(
            "several quantised files of {} in {}; run `tabula models quantize --model {}` to keep one",
            spec.name,
            dir.display(),
            spec.name
        ),
    };
    Ok((path, hash))
}
