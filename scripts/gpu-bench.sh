#!/usr/bin/env bash
# Our GPU backend next to PyTorch on CUDA, on a machine with an NVIDIA GPU (issue 18): builds the
# release binary, fetches the models, installs PyTorch with CUDA in a venv of its own (once), and
# prints `tabula bench --backends gpu` with torch-fp32-cuda as the peer, in one run. wgpu reaches
# the GPU through its Vulkan driver (the NVIDIA driver ships one; `vulkaninfo --summary` lists it).
#
#   bash scripts/gpu-bench.sh                 # every model, fast and exact precision (Gemma 3
#                                             # has no CUDA peer: ours only)
#   bash scripts/gpu-bench.sh --only minilm   # extra arguments go to `tabula bench`
#
# Environment: TABULA_GPU_BENCH_VENV (default ~/.cache/tabula-bench/cuda-venv), CARGO_TARGET_DIR.
# Put the table it prints into BENCHMARKS.md ("On a real GPU") with the GPU's name and the date.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null; then
  echo "no NVIDIA GPU here (nvidia-smi is not on PATH): run this on a machine with one" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if command -v vulkaninfo >/dev/null; then
  vulkaninfo --summary 2>/dev/null | grep -E "deviceName|driverName" || true
else
  echo "(vulkaninfo not installed: wgpu will still look for the NVIDIA Vulkan driver)"
fi
venv=${TABULA_GPU_BENCH_VENV:-$HOME/.cache/tabula-bench/cuda-venv}
if ! "$venv/bin/python" -c "import torch, transformers, onnxruntime, gguf; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "installing PyTorch (CUDA), transformers, gguf into $venv (once)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -r bench/requirements.txt
fi
target=${CARGO_TARGET_DIR:-target}
cargo build --release -p tabula-cli
"$target/release/tabula" models fetch
exec "$target/release/tabula" bench --backends gpu --peers-device cuda \
  --peers-python "$venv/bin/python" "$@"
