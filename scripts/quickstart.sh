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
echo "== exact precision: integer-only, the same bits on every device (sha256 of each embedding)"
printf 'A man is eating food.\nA man is eating a piece of bread.\n' | "$tabula" embed --precision exact \
  | python3 -c 'import sys, json; [print(json.loads(l)["sha256"]) for l in sys.stdin]'
echo
echo "== generation (SmolLM2-135M-Instruct, chat, greedy)"
"$tabula" generate --model SmolLM2-135M-Instruct --chat --prompt "What is the capital of France?" --max-tokens 48
