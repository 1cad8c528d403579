#!/usr/bin/env python3
"""Peer baselines for Tabula's benchmarks, measured on this machine (CPU; or PyTorch on CUDA with
--device cuda, next to our GPU backend: scripts/gpu-bench.sh).

Peers (CPU; fp32 unless named int8):
  * MiniLM-L6 (all-MiniLM-L6-v2) embeddings, batch 32, mean pooling + L2 norm, tokenization excluded:
      - onnxruntime-fp32: ONNX exported from the safetensors model (cached, exported on first run)
      - onnxruntime-int8: that ONNX quantised by onnxruntime's quantize_dynamic (int8 weights, int8
                          activations at run time; cached)
      - torch-fp32:       transformers AutoModel
    tasks: minilm-short-b32 (6-16 random English words, dynamic padding to the longest in the batch)
           minilm-long-b32  (texts padded/truncated to exactly 128 tokens)
  * SmolLM2-135M-Instruct (the Q4_1 GGUF), greedy:
      - torch-fp32: de-quantized to fp32 by transformers; prefill of a 128-token prompt, then 64
                    single-token decode steps (KV cache)
      - llama.cpp:  the GGUF as is, through llama-cpp-python (optional: skipped with a message when
                    it is not installed), the same prompt ids and steps
    tasks: smollm2-prefill-128 and smollm2-decode-64 (tokens/s)
  * Gemma 3 270M (the Q4_K_M GGUF), greedy, llama.cpp only: the same prompt text, tokenised by
    llama.cpp (its ids are written to the texts as `gemma_prompt_ids`, at most 128), then 64 decode
    steps. tasks: gemma3-prefill-N and gemma3-decode-64 (tokens/s)

Every figure is the best of --reps repetitions (other load on the machine only slows a run down).

The benchmark texts are generated deterministically from --seed; --texts-out PATH writes them (JSON
{"short": [...], "long": [...], "prompt": "...", "prompt_ids": [...], ...}) so that Tabula's own
benchmark measures exactly the same inputs; --texts-in PATH reuses such a file.

Run with the benchmark venv (outside the project: /root/.cache/tabula-bench/venv, with the packages below):
    /root/.cache/tabula-bench/venv/bin/python bench/peers.py --threads 1 --json \
        --texts-out /root/.cache/tabula-bench/texts.json
Needs: torch, onnxruntime, onnx, transformers, tokenizers, numpy, gguf. Runs fully offline.
Model files (default --models-dir /root/.cache/tabula/models):
    all-MiniLM-L6-v2/{config.json,model.safetensors,tokenizer.json}
    SmolLM2-135M-Instruct.Q4_1.gguf
"""
import argparse
import json
import os
import platform
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

TEXTS_FORMAT = 1
MINILM_DIR = "all-MiniLM-L6-v2"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
MAX_PROMPT = 128


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for every peer (default 1)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout (logs go to stderr)")
    ap.add_argument("--json-out", metavar="PATH", help="also write the JSON results to PATH")
    ap.add_argument("--texts-out", metavar="PATH", help="write the benchmark texts (JSON) to PATH")
    ap.add_argument("--texts-in", metavar="PATH", help="read the benchmark texts from PATH instead of generating them")
    ap.add_argument("--seed", type=int, default=0, help="seed for the generated texts (default 0)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=8, help="batches per MiniLM mode (texts = batch-size * batches)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions; the best one is reported")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--only", choices=["minilm", "smollm2", "gemma3"], help="run only one model's peers")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where the PyTorch peers run (default cpu); with cuda only they run (as "
                         "torch-fp32-cuda, each timed until its result is back on the host), next to "
                         "our GPU backend")
    ap.add_argument("--models-dir", default=os.environ.get("TABULA_MODELS", "/root/.cache/tabula/models"))
    ap.add_argument("--cache-dir", default=os.environ.get("TABULA_BENCH_CACHE", "/root/.cache/tabula-bench"),
                    help="where the exported ONNX model is cached")
    return ap.parse_args()


# ---------------------------------------------------------------------------------------------- texts

def word_list(minilm_dir):
    """Plain lowercase English words from MiniLM's vocabulary (ids 2000..12000, alphabetic only), read
    from tokenizer.json: `tabula models fetch` installs that file, not vocab.txt."""
    with open(os.path.join(minilm_dir, "tokenizer.json"), encoding="utf-8") as f:
        vocab = json.load(f)["model"]["vocab"]
    by_id = sorted(vocab, key=vocab.get)
    return [w for w in by_id[2000:12000] if w.isascii() and w.isalpha()]


def generate_texts(a, minilm_dir, smollm_tok):
    import numpy as np
    rng = np.random.default_rng(a.seed)
    words = word_list(minilm_dir)
    n = a.batch_size * a.batches

    def sent(k):
        return " ".join(words[i] for i in rng.integers(0, len(words), k))

    short = [sent(int(rng.integers(6, 17))) for _ in range(n)]      # 6..16 words
    long_ = [sent(200) for _ in range(n)]                            # > 128 tokens: truncated to 128
    t = {"format": TEXTS_FORMAT, "seed": a.seed, "batch_size": a.batch_size,
         "word_source": "all-MiniLM-L6-v2/vocab.txt[2000:12000], ascii alphabetic entries",
         "short": short, "long": long_}
    if smollm_tok is not None:
        # A prompt of random words that tokenizes (SmolLM2 tokenizer, no special tokens) to exactly
        # prompt-tokens ids: words are appended while they fit.
        ids, text, tries = [], "", 0
        while len(ids) < a.prompt_tokens and tries < 10000:
            tries += 1
            cand = (text + " " if text else "") + words[int(rng.integers(0, len(words)))]
            cid = smollm_tok(cand, add_special_tokens=False)["input_ids"]
            if len(cid) <= a.prompt_tokens:
                text, ids = cand, cid
        if len(ids) != a.prompt_tokens:
            raise SystemExit(f"could not build a {a.prompt_tokens}-token prompt")
        t["prompt"] = text
        t["prompt_ids"] = ids
        t["prompt_tokenizer"] = SMOLLM_GGUF + " (transformers GGUF tokenizer, add_special_tokens=False)"
    return t


# --------------------------------------------------------------------------------------------- MiniLM

def minilm_batches(texts, tok_path, bs, fixed_len):
    """Tokenize with the model's tokenizer.json: truncation at 128; pad to `fixed_len` or the batch's longest."""
    import numpy as np
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(tok_path)
    tok.no_padding()
    tok.enable_truncation(max_length=128)
    if fixed_len:
        tok.enable_padding(pad_id=0, pad_token="[PAD]", length=fixed_len)
    else:
        tok.enable_padding(pad_id=0, pad_token="[PAD]")
    out = []
    for i in range(0, len(texts), bs):
        enc = tok.encode_batch(texts[i:i + bs])
        out.append({
            "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
        })
    return out


def mean_pool(h, mask):
    import numpy as np
    m = mask[..., None].astype(h.dtype)
    v = (h * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def export_onnx(minilm_dir, path):
    """MiniLM to fp32 ONNX (last_hidden_state out, dynamic batch/seq), as in shared/peers/python/export_onnx.py."""
    import torch
    from transformers import AutoModel
    from tokenizers import Tokenizer
    m = AutoModel.from_pretrained(minilm_dir).eval()

    class W(torch.nn.Module):
        def __init__(s, m):
            super().__init__()
            s.m = m

        def forward(s, input_ids, attention_mask, token_type_ids):
            return s.m(input_ids=input_ids, attention_mask=attention_mask,
                       token_type_ids=token_type_ids).last_hidden_state

    tok = Tokenizer.from_file(os.path.join(minilm_dir, "tokenizer.json"))
    tok.no_truncation()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")           # padded example: the mask path is traced
    enc = tok.encode_batch(["hello world", "a longer second sentence here"])
    args = tuple(torch.tensor([getattr(e, k) for e in enc], dtype=torch.int64)
                 for k in ("ids", "attention_mask", "type_ids"))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    dyn = {k: {0: "batch", 1: "seq"} for k in names + ["last_hidden_state"]}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.onnx.export(W(m), args, tmp, dynamo=False, input_names=names, output_names=["last_hidden_state"],
                      dynamic_axes=dyn, opset_version=17)
    os.replace(tmp, path)


def best_of(reps, fn):
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_minilm(a, texts, results, checks):
    import numpy as np
    import torch
    import onnxruntime as ort
    from transformers import AutoModel

    mdir = os.path.join(a.models_dir, MINILM_DIR)
    onnx_path = os.path.join(a.cache_dir, "minilm_l6_fp32.onnx")
    if not os.path.exists(onnx_path):
        log(f"exporting ONNX to {onnx_path} ...")
        t = time.perf_counter()
        export_onnx(mdir, onnx_path)
        log(f"  exported in {time.perf_counter() - t:.1f} s")

    int8_path = os.path.join(a.cache_dir, "minilm_l6_int8_dynamic.onnx")
    if not os.path.exists(int8_path):
        # onnxruntime's dynamic int8 quantisation, as its docs recommend for transformers on CPU:
        # int8 weights, activations quantised at run time (DynamicQuantizeLinear + MatMulInteger).
        from onnxruntime.quantization import QuantType, quantize_dynamic
        log(f"quantising ONNX to {int8_path} ...")
        quantize_dynamic(onnx_path, int8_path + ".tmp", weight_type=QuantType.QInt8)
        os.replace(int8_path + ".tmp", int8_path)

    cuda = a.device == "cuda"
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    sess_int8 = ort.InferenceSession(int8_path, so, providers=["CPUExecutionProvider"])
    tm = AutoModel.from_pretrained(mdir, dtype=torch.float32).eval().to(a.device)

    def run_ort(b):
        return mean_pool(sess.run(None, b)[0], b["attention_mask"])

    def run_ort_int8(b):
        return mean_pool(sess_int8.run(None, b)[0], b["attention_mask"])

    def run_torch(b):
        with torch.inference_mode():
            h = tm(**{k: torch.from_numpy(v).to(a.device) for k, v in b.items()}).last_hidden_state
            h = h.cpu().numpy()                          # waits for the GPU, as a caller would
        return mean_pool(h, b["attention_mask"])

    torch_name = "torch-fp32-cuda" if cuda else "torch-fp32"
    peers = {torch_name: run_torch} if cuda else {
        "onnxruntime-fp32": run_ort, "onnxruntime-int8": run_ort_int8, "torch-fp32": run_torch}
    bs = a.batch_size
    modes = {f"minilm-short-b{bs}": (texts["short"], None), f"minilm-long-b{bs}": (texts["long"], 128)}
    for task, (T, fixed) in modes.items():
        pre = minilm_batches(T, os.path.join(mdir, "tokenizer.json"), bs, fixed)
        n = sum(b["input_ids"].shape[0] for b in pre)
        padded = float(np.mean([b["input_ids"].shape[1] for b in pre]))
        real = float(np.mean([b["attention_mask"].sum(1).mean() for b in pre]))
        embs = {}
        for peer, f in peers.items():
            f(pre[0])                                                   # warm-up
            dt, outs = best_of(a.reps, lambda: [f(b) for b in pre])
            embs[peer] = np.concatenate(outs)
            v = n / dt
            log(f"{task:18s} {peer:18s} {v:8.1f} sentences/s  ({dt / len(pre) * 1000:7.1f} ms/batch, "
                f"mean padded len {padded:.1f}, mean real len {real:.1f})")
            results.append({"peer": peer, "task": task,
                            "unit": "sentences/s", "value": round(v, 2),
                            "detail": {"texts": n, "batch_size": bs, "mean_padded_len": round(padded, 2),
                                       "mean_tokens": round(real, 2), "best_s": round(dt, 4), "reps": a.reps}})
        if cuda:
            continue
        cos = float(np.min(np.sum(embs["onnxruntime-fp32"] * embs["torch-fp32"], 1)))
        checks[f"{task}: min cosine onnxruntime vs torch"] = round(cos, 6)
        log(f"{task:18s} min cosine onnxruntime vs torch: {cos:.6f}")
        if cos < 0.999:
            log("  WARNING: onnxruntime and torch embeddings disagree")
        cos8 = float(np.min(np.sum(embs["onnxruntime-int8"] * embs["torch-fp32"], 1)))
        checks[f"{task}: min cosine onnxruntime-int8 vs torch"] = round(cos8, 6)
        log(f"{task:18s} min cosine onnxruntime-int8 vs torch: {cos8:.6f}")


# -------------------------------------------------------------------------------------------- SmolLM2

def load_smollm(a, need_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(a.models_dir, gguf_file=SMOLLM_GGUF) if need_tokenizer else None
    m = AutoModelForCausalLM.from_pretrained(a.models_dir, gguf_file=SMOLLM_GGUF, dtype=torch.float32).eval()
    m = m.to(a.device)
    log(f"SmolLM2 GGUF loaded by transformers ({type(m).__name__}, de-quantized to "
        f"{next(m.parameters()).dtype}) in {time.perf_counter() - t:.1f} s")
    return tok, m


def bench_smollm(a, texts, model, results, checks):
    import torch
    from transformers import DynamicCache

    ids = texts["prompt_ids"]
    prompt = torch.tensor([ids], dtype=torch.int64, device=a.device)
    P, D = prompt.shape[1], a.decode_tokens
    peer = "torch-fp32-cuda" if a.device == "cuda" else "torch-fp32"

    def prefill():
        cache = DynamicCache()
        with torch.inference_mode():
            out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
        return out.logits[0, -1].argmax().item(), out.past_key_values

    def decode(first, cache):
        gen, nxt = [first], first
        with torch.inference_mode():
            for _ in range(D):                                     # D single-token forward passes
                out = model(input_ids=torch.tensor([[nxt]], device=a.device), past_key_values=cache,
                            use_cache=True)
                cache = out.past_key_values
                nxt = out.logits[0, -1].argmax().item()
                gen.append(nxt)
        return gen

    prefill()                                                      # warm-up
    dt_p, _ = best_of(a.reps, prefill)
    dt_d, gen = float("inf"), None
    for _ in range(max(1, a.reps - 1)):
        first, cache = prefill()
        t = time.perf_counter()
        g = decode(first, cache)
        dt_d = min(dt_d, time.perf_counter() - t)
        if gen is not None and g != gen:
            log("  WARNING: greedy decode not deterministic across repetitions")
        gen = g
    vp, vd = P / dt_p, D / dt_d
    log(f"smollm2-prefill-{P:<4d} {peer:17s} {vp:8.1f} tokens/s  ({dt_p * 1000:.1f} ms)")
    log(f"smollm2-decode-{D:<5d} {peer:17s} {vd:8.1f} tokens/s  ({dt_d / D * 1000:.1f} ms/token)")
    common = {"model": SMOLLM_GGUF + " de-quantized to fp32 by transformers", "reps": a.reps}
    results.append({"peer": peer, "task": f"smollm2-prefill-{P}", "unit": "tokens/s", "value": round(vp, 2),
                    "detail": {**common, "prompt_tokens": P, "best_s": round(dt_p, 4)}})
    results.append({"peer": peer, "task": f"smollm2-decode-{D}", "unit": "tokens/s", "value": round(vd, 2),
                    "detail": {**common, "prompt_tokens": P, "decode_steps": D, "best_s": round(dt_d, 4)}})
    # Greedy continuation (first id from the prefill, then one per decode step): a correctness reference.
    checks["smollm2 greedy ids after the prompt"] = gen


def import_llama_cpp():
    """llama-cpp-python, or None (said once) when it is not installed."""
    try:
        import llama_cpp
        return llama_cpp
    except ImportError:
        log("llama-cpp-python is not installed: the llama.cpp peer is skipped "
            "(CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python)")
        return None


def gemma_prompt_ids(a, texts):
    """llama.cpp's ids of the prompt text for Gemma 3 (with its BOS), at most MAX_PROMPT."""
    llama_cpp = import_llama_cpp()
    path = os.path.join(a.models_dir, GEMMA_GGUF)
    if llama_cpp is None or not os.path.exists(path) or "prompt" not in texts:
        return None
    vocab = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    return [int(t) for t in vocab.tokenize(texts["prompt"].encode(), add_bos=True, special=False)][:MAX_PROMPT]


def bench_llama_cpp(a, texts, results, checks, task="smollm2", gguf=SMOLLM_GGUF, ids_key="prompt_ids"):
    """llama.cpp (through llama-cpp-python) on the same GGUF file and prompt ids: prefill of the
    prompt in one batch, then greedy decoding one token per step. Not installed: said, and skipped
    (pip install llama-cpp-python builds llama.cpp from source, see BENCHMARKS.md)."""
    llama_cpp = import_llama_cpp()
    if llama_cpp is None or ids_key not in texts:
        return
    ids = texts[ids_key]
    P, D = len(ids), a.decode_tokens
    llm = llama_cpp.Llama(os.path.join(a.models_dir, gguf), n_ctx=P + D + 8, n_batch=P,
                          n_threads=a.threads, n_threads_batch=a.threads, verbose=False)

    def prefill():
        llm.reset()
        llm.eval(ids)

    def decode():
        gen = []
        for _ in range(D):
            tok = llm.sample(top_k=1, temp=0.0)
            gen.append(int(tok))
            llm.eval([tok])
        return gen

    prefill()                                                      # warm-up
    dt_p, _ = best_of(a.reps, prefill)
    dt_d, gen = float("inf"), None
    for _ in range(max(1, a.reps - 1)):
        prefill()
        t = time.perf_counter()
        gen = decode()
        dt_d = min(dt_d, time.perf_counter() - t)
    vp, vd = P / dt_p, D / dt_d
    log(f"{task}-prefill-{P:<4d} llama.cpp         {vp:8.1f} tokens/s  ({dt_p * 1000:.1f} ms)")
    log(f"{task}-decode-{D:<5d} llama.cpp         {vd:8.1f} tokens/s  ({dt_d / D * 1000:.1f} ms/token)")
    common = {"model": gguf + " as is", "reps": a.reps, "llama_cpp_python": llama_cpp.__version__}
    results.append({"peer": "llama.cpp", "task": f"{task}-prefill-{P}", "unit": "tokens/s", "value": round(vp, 2),
                    "detail": {**common, "prompt_tokens": P, "best_s": round(dt_p, 4)}})
    results.append({"peer": "llama.cpp", "task": f"{task}-decode-{D}", "unit": "tokens/s", "value": round(vd, 2),
                    "detail": {**common, "prompt_tokens": P, "decode_steps": D, "best_s": round(dt_d, 4)}})
    checks[f"{task} llama.cpp greedy ids"] = gen


# ---------------------------------------------------------------------------------------------- main

def machine_info(a):
    cpu, flags = platform.processor(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("", platform.machine()):
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    break
    except OSError:
        pass
    import numpy, torch, onnxruntime, transformers, tokenizers
    return {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "threads": a.threads,
        "isa": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8")
                if f in flags],
        "os": platform.platform(), "python": platform.python_version(),
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "numpy": numpy.__version__},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def loadavg():
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return None


def main():
    a = parse_args()
    import torch
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    torch.set_num_threads(a.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass

    if a.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: PyTorch sees no CUDA device (torch.cuda.is_available() is False; "
                     f"torch {torch.__version__} built for CUDA {torch.version.cuda}); install a CUDA "
                     "build of torch and check nvidia-smi")
        if a.only == "gemma3":
            sys.exit("--device cuda: Gemma 3's peer is llama.cpp on the CPU; use --only minilm or smollm2")
    machine = machine_info(a)
    if a.device == "cuda":
        machine["cuda_device"] = torch.cuda.get_device_name(0)
    machine["loadavg_before"] = loadavg()
    log(f"cpu: {machine['cpu']} ({machine['logical_cpus']} logical), threads={a.threads}, "
        f"torch {machine['versions']['torch']}, onnxruntime {machine['versions']['onnxruntime']}, "
        f"transformers {machine['versions']['transformers']}, loadavg {machine['loadavg_before']}")

    want_minilm = a.only in (None, "minilm")
    want_llm = a.only in (None, "smollm2")
    want_gemma = a.only in (None, "gemma3") and a.device == "cpu"
    minilm_dir = os.path.join(a.models_dir, MINILM_DIR)

    if a.texts_in:
        with open(a.texts_in, encoding="utf-8") as f:
            texts = json.load(f)
        log(f"texts read from {a.texts_in}")
    else:
        texts = None
    smollm_tok = smollm = None
    if want_llm or (texts is None and a.texts_out):
        need_tok = texts is None or "prompt_ids" not in texts
        try:
            smollm_tok, smollm = load_smollm(a, need_tok)
        except Exception as e:                        # report why, still run the rest
            log(f"SmolLM2 via transformers' GGUF loader FAILED: {type(e).__name__}: {e}")
            want_llm = False
            machine["smollm2_error"] = f"{type(e).__name__}: {e}"
    if texts is None:
        texts = generate_texts(a, minilm_dir, smollm_tok)
    elif "prompt_ids" not in texts and smollm_tok is not None:
        texts.update({k: v for k, v in generate_texts(a, minilm_dir, smollm_tok).items()
                      if k.startswith("prompt")})
    if want_gemma and "gemma_prompt_ids" not in texts:
        ids = gemma_prompt_ids(a, texts)
        if ids:
            texts["gemma_prompt_ids"] = ids
    if a.texts_out:
        os.makedirs(os.path.dirname(os.path.abspath(a.texts_out)), exist_ok=True)
        with open(a.texts_out, "w", encoding="utf-8") as f:
            json.dump(texts, f, indent=1, ensure_ascii=False)
        log(f"texts written to {a.texts_out}")

    results, checks = [], {}
    if want_minilm:
        bench_minilm(a, texts, results, checks)
    if want_llm:
        if "prompt_ids" not in texts:
            log("no prompt_ids in the texts: SmolLM2 skipped")
        else:
            bench_smollm(a, texts, smollm, results, checks)
            if a.device == "cpu":
                bench_llama_cpp(a, texts, results, checks)
    if want_gemma:
        bench_llama_cpp(a, texts, results, checks, "gemma3", GEMMA_GGUF, "gemma_prompt_ids")
    machine["loadavg_after"] = loadavg()
    log(f"loadavg after: {machine['loadavg_after']} (above {os.cpu_count()} means other processes competed)")

    doc = {"machine": machine, "results": results, "checks": checks,
           "texts": {"source": a.texts_in or f"generated, seed {texts.get('seed')}", "written_to": a.texts_out}}
    if a.json_out:
        with open(a.json_out, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
    if a.json:
        print(json.dumps(doc, indent=1))
    else:
        for r in results:
            print(f"{r['task']:20s} {r['peer']:18s} {r['value']:10.2f} {r['unit']}")


if __name__ == "__main__":
    main()
