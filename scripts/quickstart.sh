#!/usr/bin/env bash
# From a fresh clone: build the CLI, fetch the real models, embed and generate a sample.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p tabula-cli
tabula=${CARGO_TARGET_DIR:-target}/release/tabula
"$tabula" models fetch
echo
echo "== embeddings (first values of each 384-dimensional vector)"
printf 'A man is eating food.\nA man is eating a piece of bread.\n' | "$tabula" embed | cut -c1-110
echo
echo "== generation (SmolLM2-135M-Instruct, chat, greedy)"
"$tabula" generate --model SmolLM2-135M-Instruct --chat --prompt "What is the capital of France?" --max-tokens 48
