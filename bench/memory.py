#!/usr/bin/env python3
"""Peak resident memory of one worker-sized job, ours next to the peers, in one run.

For each program: the peak RSS (kernel's ru_maxrss of the child) of loading the model and
running one job on it, one thread:
  * MiniLM: 32 texts of 128 tokens (the long benchmark texts), embedded once.
      ours: `tabula embed` fast and exact;  peers: onnxruntime fp32 and dynamic int8 (the
      cached ONNX files of bench/peers.py)
  * SmolLM2: the 128-token benchmark prompt, then 64 greedy tokens.
      ours: `tabula generate` fast and exact;  peer: llama.cpp (llama-cpp-python) on the GGUF

Python peers include the interpreter and their imports (numpy, tokenizers, onnxruntime), as a
worker built on them would. Usage (after `bench/peers.py --texts-out TEXTS` has written the texts
and the ONNX files):
    VENV/bin/python bench/memory.py --tabula target/release/tabula --texts TEXTS
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--tabula", required=True)
ap.add_argument("--texts", required=True)
ap.add_argument("--models-dir", default=os.environ.get("TABULA_MODELS", os.path.expanduser("~/.cache/tabula/models")))
ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/tabula-bench"))
a = ap.parse_args()
texts = json.load(open(a.texts))
long_texts = texts["long"][:32]
prompt = texts["prompt"]


def peak_mb(cmd, stdin=None):
    """Runs `cmd` alone and returns its peak RSS in MB (RUSAGE_CHILDREN grows monotonically, so
    each measurement runs in a fresh intermediate process)."""
    probe = ("import resource, subprocess, sys; "
             "r = subprocess.run(sys.argv[1:], stdin=sys.stdin, stdout=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if r.returncode == 0 else -1)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], input=stdin, capture_output=True, text=True)
    kb = int(out.stdout.strip() or -1)
    if kb < 0:
        raise SystemExit(f"{cmd[0]} failed: {out.stderr[-2000:]}")
    return kb / 1024


ORT = """
import sys, numpy as np, onnxruntime as ort
from tokenizers import Tokenizer
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
tok = Tokenizer.from_file(sys.argv[2]); tok.enable_truncation(128); tok.enable_padding(length=128)
enc = tok.encode_batch(sys.stdin.read().split("\\n"))
ids = np.array([e.ids for e in enc], dtype=np.int64); mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
s.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
"""
LLAMA = """
import sys, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False)
llm(sys.argv[2], max_tokens=64, temperature=0.0)
"""
mdir = os.path.join(a.models_dir, "all-MiniLM-L6-v2")
rows = []
joined = "\n".join(long_texts)
for precision in ["fast", "exact"]:
    rows.append(("minilm 32×128 tokens", f"tabula {precision}",
                 peak_mb([a.tabula, "embed", "--precision", precision, "--models-dir", a.models_dir], joined)))
for name, path in [("onnxruntime-fp32", "minilm_l6_fp32.onnx"), ("onnxruntime-int8", "minilm_l6_int8_dynamic.onnx")]:
    rows.append(("minilm 32×128 tokens", name,
                 peak_mb([sys.executable, "-c", ORT, os.path.join(a.cache_dir, path), os.path.join(mdir, "tokenizer.json")], joined)))
for precision in ["fast", "exact"]:
    rows.append(("smollm2 prompt + 64 tokens", f"tabula {precision}",
                 peak_mb([a.tabula, "generate", "--precision", precision, "--models-dir", a.models_dir,
                          "--prompt", prompt, "--max-tokens", "64", "--temperature", "0"])))
try:
    import llama_cpp  # noqa: F401
    rows.append(("smollm2 prompt + 64 tokens", "llama.cpp",
                 peak_mb([sys.executable, "-c", LLAMA, os.path.join(a.models_dir, "SmolLM2-135M-Instruct.Q4_1.gguf"), prompt])))
except ImportError:
    print("llama-cpp-python is not installed: the llama.cpp row is missing", file=sys.stderr)
print("| job | program | peak RSS (MB) |")
print("|---|---|---:|")
for job, prog, mb in rows:
    print(f"| {job} | {prog} | {mb:.0f} |")
