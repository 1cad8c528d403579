//! What the CLI's test binaries share.

use std::{path::Path, process::Command};

/// The random Llama-family GGUFs of `tests/fixtures/make_llama_family.py`, written into
/// `out` (`qwen2-gqa4.gguf`, `llama-gqa1.gguf`). Needs `python3` with `gguf` and `numpy`, or
/// `$TABULA_PYLIB` holding them (where `tests/run-all.sh` installs them).
pub fn make_random_ggufs(manifest_dir: &Path, out: &Path) {
    let script = manifest_dir.join("../../tests/fixtures/make_llama_family.py");
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
