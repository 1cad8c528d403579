#!/usr/bin/env bash
# Every test of the project. Installs what it needs first (scripts/setup.sh: lavapipe, Chromium,
# PostgreSQL, the wasm target, wasm-bindgen-cli, npm packages; quick when they are there) and
# fetches the real models (idempotent, sha256-checked).
set -euo pipefail
cd "$(dirname "$0")/.."
export TABULA_TOOLS=${TABULA_TOOLS:-$HOME/.cache/tabula-ci}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$TABULA_TOOLS/target}
step() { printf '\n=== %s (%s)\n' "$*" "$(date +%T)"; }

step "setup (scripts/setup.sh)"
bash scripts/setup.sh

step "formatting and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy -p tabula-web --target wasm32-unknown-unknown -- -D warnings
cargo clippy -p tabula-protocol --target wasm32-unknown-unknown -- -D warnings

step "real model weights, and their exact-precision (int8) files"
cargo run -q -p tabula-cli -- models fetch
cargo run -q -p tabula-cli -- models quantize

step "Python packages: the official openai client (the coordinator's API test), gguf and numpy (random GGUFs made at test time)"
export TABULA_PYLIB=${TABULA_PYLIB:-$TABULA_TOOLS/pylib}
if ! PYTHONPATH=$TABULA_PYLIB python3 -c "import openai, gguf, numpy" 2>/dev/null; then
  python3 -m pip install -q --target "$TABULA_PYLIB" openai gguf==0.19.0 numpy
fi

step "PostgreSQL for the coordinator tests (SQLite needs nothing)"
if [ -z "${TABULA_TEST_POSTGRES_URL:-}" ]; then
  TABULA_TEST_POSTGRES_URL=$(bash scripts/postgres.sh)
  export TABULA_TEST_POSTGRES_URL
fi
echo "PostgreSQL at $TABULA_TEST_POSTGRES_URL"

step "the credit contract: committed artifact matches its source, forge tests (npm solc, forge)"
bash contracts/test.sh

step "Rust tests (CPU backend, wgpu on the machine's Vulkan device, the CLI end to end, the coordinator with workers and adversaries on SQLite and PostgreSQL, settlement on the embedded EVM and on anvil)"
cargo test --workspace --no-fail-fast

step "wasm build and browser tests (headless Chromium, WebGPU on SwiftShader and wasm CPU)"
bash scripts/build-wasm.sh
node --test tests/browser/
step "all tests passed"
