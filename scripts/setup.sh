#!/usr/bin/env bash
# Installs what building and testing Tabula needs on a fresh Debian machine; idempotent and
# quick when everything is there. `tests/run-all.sh` and `scripts/build-wasm.sh` (npm run build)
# run it first, so the README's commands work on a new machine.
#
#   bash scripts/setup.sh          everything the tests need
#   bash scripts/setup.sh wasm     only the wasm build's tools (target, wasm-bindgen-cli)
#
# Debian packages need root (or sudo). Tool binaries go to $TABULA_TOOLS
# (default ~/.cache/tabula-ci), outside the clone.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
tools=${TABULA_TOOLS:-$HOME/.cache/tabula-ci}
mkdir -p "$tools"
say() { printf 'setup: %s\n' "$*" >&2; }

if [ "$what" = all ]; then
  packages=(mesa-vulkan-drivers libvulkan1 vulkan-tools chromium unzip postgresql)
  missing=()
  for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if ! python3 -m pip --version >/dev/null 2>&1; then missing+=(python3-pip); fi
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    sudo=()
    if [ "$(id -u)" != 0 ]; then
      if command -v sudo >/dev/null; then
        sudo=(sudo)
      else
        say "need root or sudo to install ${missing[*]} (apt-get install ${missing[*]})"
        exit 1
      fi
    fi
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
  say "adding the wasm32-unknown-unknown Rust target"
  rustup target add wasm32-unknown-unknown
fi
if [ "$what" = all ]; then
  rustup component add clippy rustfmt 2>/dev/null || true
fi

# wasm-bindgen-cli must equal the wasm-bindgen crate in Cargo.lock.
version=$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')
if [ ! -x "$tools/wasm-bindgen-$version/bin/wasm-bindgen" ]; then
  say "installing wasm-bindgen-cli $version into $tools (a few minutes, once)"
  # Not --locked: a pinned dependency of the CLI is missing from the registry mirror.
  cargo install -q wasm-bindgen-cli --version "$version" --root "$tools/wasm-bindgen-$version"
fi

if [ "$what" = all ] && ! npm ls --silent >/dev/null 2>&1; then
  say "installing npm packages (npm ci)"
  npm ci --no-audit --no-fund
fi
