#!/usr/bin/env bash
# Builds crates/web for the browser into www/pkg (wasm-bindgen --target web), with the `wasm`
# profile of Cargo.toml (release, LTO, no debug info) and without the symbol-name section.
# wasm-bindgen must match the wasm-bindgen crate in Cargo.lock; scripts/setup.sh installs it
# (and the wasm target) into $TABULA_TOOLS (default ~/.cache/tabula-ci) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh wasm
tools=${TABULA_TOOLS:-$HOME/.cache/tabula-ci}
version=$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')
bindgen="$tools/wasm-bindgen-$version/bin/wasm-bindgen"
if [ ! -x "$bindgen" ]; then
  bindgen=$(command -v wasm-bindgen || true)
  if [ -z "$bindgen" ] || [ "$("$bindgen" --version | awk '{print $2}')" != "$version" ]; then
    echo "wasm-bindgen $version not found: cargo install wasm-bindgen-cli --version $version --root $tools/wasm-bindgen-$version" >&2
    exit 1
  fi
fi
target_dir=${CARGO_TARGET_DIR:-target}
cargo build -p tabula-web --target wasm32-unknown-unknown --profile wasm
"$bindgen" --target web --remove-name-section --remove-producers-section --out-dir www/pkg "$target_dir/wasm32-unknown-unknown/wasm/tabula_web.wasm"
gzip -9 -c www/pkg/tabula_web_bg.wasm | wc -c | awk '{printf "www/pkg/tabula_web_bg.wasm: %d bytes gzipped\n", $1}'

# A second build with wasm relaxed SIMD (int8 dot products), for browsers that have it; same
# bits as the first. RUSTFLAGS replaces .cargo/config.toml's flags, so they are repeated, and
# its own target dir keeps the two builds from invalidating each other.
RUSTFLAGS='--cfg getrandom_backend="wasm_js" -C target-feature=+simd128,+relaxed-simd' \
  cargo build -p tabula-web --target wasm32-unknown-unknown --profile wasm --target-dir "$target_dir/relaxed-simd"
"$bindgen" --target web --remove-name-section --remove-producers-section --out-dir www/pkg-relaxed "$target_dir/relaxed-simd/wasm32-unknown-unknown/wasm/tabula_web.wasm"
gzip -9 -c www/pkg-relaxed/tabula_web_bg.wasm | wc -c | awk '{printf "www/pkg-relaxed/tabula_web_bg.wasm: %d bytes gzipped\n", $1}'

# The extension runs the same worker in its offscreen document: it needs its own copies.
rm -rf www/extension/pkg
cp -r www/pkg www/extension/pkg
cp www/worker.js www/compute.js www/engine.js www/extension/
cp www/peers.js www/extension/peers.js
rm -rf www/extension/pkg-relaxed
cp -r www/pkg-relaxed www/extension/pkg-relaxed
