#!/usr/bin/env python3
"""Pipeline sessions through a real cluster on loopback: `tabula serve --local --pipeline N`
and six `tabula worker` processes, a streamed completion over the OpenAI API, timed token by
token as the requester sees it. Measures, in one run:

- one pipeline vs two (what verification by a second pipeline costs the requester),
- direct WebRTC data channels vs every activation relayed through the coordinator,
- the whole model as one unit on one worker (no stages) for reference.

Standard library only. Usage:
    python3 bench/pipeline_cluster.py --tabula target/release/tabula [--tokens 48] [--stages 3]
Prints a Markdown table (BENCHMARKS.md, "Pipeline sessions through the coordinator").
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def metric(port, name):
    for line in get(f"http://127.0.0.1:{port}/metrics").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


class Cluster:
    def __init__(self, tabula, serve_args, worker_args, workers):
        self.tabula = tabula
        self.dir = tempfile.mkdtemp(prefix="tabula-pipebench-")
        self.port = free_port()
        self.procs = []
        data = os.path.join(self.dir, "data")
        log = open(os.path.join(self.dir, "serve.log"), "w")
        self.procs.append(subprocess.Popen(
            [tabula, "serve", "--data-dir", data, "--listen", f"127.0.0.1:{self.port}", "--local",
             "--canary-rate", "0", "--audit-rate", "0", "--probation-units", "0"] + serve_args,
            stdout=subprocess.DEVNULL, stderr=log))
        deadline = time.time() + 60
        while True:
            try:
                get(f"http://127.0.0.1:{self.port}/healthz")
                break
            except Exception:
                if time.time() > deadline:
                    raise SystemExit("the coordinator did not come up: " + open(log.name).read())
                time.sleep(0.2)
        self.key = subprocess.check_output(
            [tabula, "keys", "create", "--data-dir", data], text=True).strip()
        for n in range(workers):
            self.procs.append(subprocess.Popen(
                [tabula, "worker", "--coordinator", f"http://127.0.0.1:{self.port}",
                 "--state-dir", os.path.join(self.dir, f"w{n}")] + worker_args,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 60
        while metric(self.port, "tabula_workers_connected") < workers:
            if time.time() > deadline:
                raise SystemExit("workers did not connect")
            time.sleep(0.1)

    def stream(self, prompt, tokens):
        body = json.dumps({"model": "SmolLM2-135M-Instruct", "prompt": prompt,
                           "max_tokens": tokens, "temperature": 0, "stream": True}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/completions", data=body,
            headers={"content-type": "application/json", "authorization": f"Bearer {self.key}"})
        start = time.time()
        times, text = [], ""
        with urllib.request.urlopen(req, timeout=600) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise SystemExit(f"the session failed: {event}")
                piece = event["choices"][0].get("text") or ""
                if piece:
                    times.append(time.time() - start)
                    text += piece
        return times, text

    def close(self):
        for p in self.procs:
            p.kill()
            p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def run(tabula, label, serve_args, worker_args, workers, prompt, tokens, repeats):
    c = Cluster(tabula, serve_args, worker_args, workers)
    try:
        c.stream(prompt, 4)  # warm: weights downloaded and cached by every worker
        best = None
        for _ in range(repeats):
            steps0 = metric(c.port, "tabula_pipeline_steps_agreed_total")
            t0 = time.time()
            times, text = c.stream(prompt, tokens)
            total = time.time() - t0
            steps = metric(c.port, "tabula_pipeline_steps_agreed_total") - steps0
            first = times[0] if times else total
            rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
            row = (first, rate, total, steps, text)
            if best is None or row[1] > best[1]:
                best = row
        relayed = metric(c.port, "tabula_pipeline_relayed_bytes_total")
        direct = metric(c.port, "tabula_pipeline_links_direct_total")
        relay_links = metric(c.port, "tabula_pipeline_links_relayed_total")
        return dict(label=label, first=best[0], rate=best[1], total=best[2], steps=best[3],
                    text=best[4], relayed=relayed, direct=direct, relay_links=relay_links)
    finally:
        c.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tabula", default="target/release/tabula")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompt", default="Once upon a time, in a small village,")
    a = ap.parse_args()
    n = str(a.stages)
    rows = [
        run(a.tabula, "whole model, one unit on one worker (2 replicas)", ["--pipeline", "off"], [],
            2, a.prompt, a.tokens, a.repeats),
        run(a.tabula, f"{n} stages, 1 pipeline, direct", ["--pipeline", n, "--pipeline-replicas", "1"],
            [], a.stages, a.prompt, a.tokens, a.repeats),
        run(a.tabula, f"{n} stages, 2 pipelines, direct", ["--pipeline", n], [], 2 * a.stages,
            a.prompt, a.tokens, a.repeats),
        run(a.tabula, f"{n} stages, 2 pipelines, relayed", ["--pipeline", n],
            ["--stage-links", "relay"], 2 * a.stages, a.prompt, a.tokens, a.repeats),
    ]
    texts = {r["text"] for r in rows}
    if len(texts) != 1:
        sys.exit(f"the configurations answered differently: {texts}")
    print("| configuration | first token s | decode tokens/s (streamed) | end to end tokens/s | "
          "activation bytes relayed |")
    print("|---|---|---|---|---|")
    for r in rows:
        rate = f"{r['rate']:.1f}" if r["rate"] else "– (one delta)"
        print(f"| {r['label']} | {r['first']:.2f} | {rate} | {a.tokens / r['total']:.1f} | "
              f"{int(r['relayed'])} |")
    print(f"\nall configurations gave the same {a.tokens} tokens: {rows[0]['text'][:60]!r}…")


if __name__ == "__main__":
    main()
