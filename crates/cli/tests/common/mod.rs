//! What the CLI's test binaries share.

use std::{path::Path, process::Command};

/// Runs the generator `tests/fixtures/{script} --out {out}` (seeded: the same files on every
/// machine). Needs `python3` with `gguf` and `numpy`, or `$TABULA_PYLIB` holding them (where
/// `tests/run-all.sh` installs them).
fn generate(manifest_dir: &Path, script: &str, out: &Path) {
    let script = manifest_dir.join("../../tests/fixtures").join(script);
    let mut python = Command::new("python3");
    python.arg(&script).arg("--out").arg(out);
    if let Some(lib) = std::env::var_os("TABULA_PYLIB") {
        python.env("PYTHONPATH", lib);
    }
    let done = python.output().expect("python3");
    assert!(
        done.status.success(),
        "{} failed (it needs the `gguf` and `numpy` packages):\n{}",
        script.display(),
        String::from_utf8_lossy(&done.stderr)
    );
}

/// The random Llama-family GGUFs of `tests/fixtures/make_llama_family.py`, written into
/// `out` (`qwen2-gqa4.gguf`, `llama-gqa1.gguf`).
pub fn make_random_ggufs(manifest_dir: &Path, out: &Path) {
    generate(manifest_dir, "make_llama_family.py", out);
}

/// The random BERT directories of `tests/fixtures/make_bert_dirs.py`, written into `out`
/// (`bert-cls/`, `bert-max/`, `bert-mean/`), whose reference embeddings are in
/// `tests/fixtures/bert-random.json`.
pub fn make_random_bert_dirs(manifest_dir: &Path, out: &Path) {
    generate(manifest_dir, "make_bert_dirs.py", out);
}
