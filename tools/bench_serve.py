"""Serving throughput: new tokens/s for N concurrent streaming clients of `minisft serve`, against the
engine's own batched generate() on the same prompts in the same run.

    flock /tmp/minisft-bench.lock python tools/bench_serve.py [--streams 1 4 16 --tokens 64 --backend numba]

The model has gpt2-small's shapes with random weights (float32), written once as an HF folder and
served by `python -m minisft serve --weights DIR` in its own process. Each client sends one of the
book's test prompts (alpaca, ending with the response header) to /v1/completions with stream: true
and reads every chunk; the clients start together. Tokens are the usage counts the server reports.
aggregate tokens/s = all completion tokens / (last stream's end - first request), per stream =
one stream's tokens / its own duration, first token = the wait for a stream's first text chunk.
The engine column runs generate(model, the same N prompts, tokens) in this process right after
each served measurement: the batched decoding the server does, without HTTP, threads or admission.
Every figure is the median over --rounds rounds.
"""
import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minisft import GPT, GPTConfig, tokenizer  # noqa: E402
from minisft.data import load_splits  # noqa: E402
from minisft.generate import generate  # noqa: E402
from minisft.prompts import get_style  # noqa: E402

DATA = ROOT / "minisft" / "assets" / "instruction-data.json"  # the book's records, as bundled


def stream_one(url, prompt, tokens, out, i):
    t0 = time.perf_counter()
    first, usage = None, None
    with requests.post(url + "/v1/completions", stream=True, timeout=600, json=dict(
            model="bench", prompt=prompt, max_tokens=tokens, temperature=0, stream=True,
            stream_options={"include_usage": True})) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter()
            usage = chunk.get("usage") or usage
    out[i] = dict(start=t0, first=first, end=time.perf_counter(), tokens=usage["completion_tokens"])


def run_clients(url, prompts, tokens):
    out, threads = [None] * len(prompts), []
    for i, p in enumerate(prompts):
        threads.append(threading.Thread(target=stream_one, args=(url, p, tokens, out, i)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = sum(o["tokens"] for o in out)
    wall = max(o["end"] for o in out) - min(o["start"] for o in out)
    return dict(aggregate=total / wall, per_stream=sum(o["tokens"] / (o["end"] - o["start"]) for o in out) / len(out),
                first_token=sum(o["first"] - o["start"] for o in out) / len(out), tokens=total, wall=wall)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--tokens", type=int, default=64, help="max_tokens per request")
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--model", default="gpt2-small", help="the shape (random weights)")
    ap.add_argument("--rounds", type=int, default=3, help="medians over this many rounds")
    args = ap.parse_args()
    style = get_style("alpaca")
    test = load_splits(str(DATA))[1].test
    prompts = [style.prompt(r["messages"]) for r in test[:max(args.streams)]]
    with tempfile.TemporaryDirectory() as tmp:
        GPT(GPTConfig.preset(args.model), seed=0).save_pretrained(tmp)
        log = open(Path(tmp) / "serve.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "minisft", "serve", "--weights", tmp, "--backend", args.backend,
                                 "--port", "0", "--name", "bench", "--max-batch", str(max(args.streams))],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
        model = GPT.from_pretrained(tmp, backend=args.backend)
        ids = [tokenizer.encode(p) for p in prompts]
        served, engine = {n: [] for n in args.streams}, {n: [] for n in args.streams}
        try:
            url = re.search(r"(http://\S+)/v1", proc.stdout.readline()).group(1)
            run_clients(url, prompts[:2], 4)  # warm-up: numba's kernels compile or load from the cache
            generate(model, ids[:2], 4)
            for _ in range(args.rounds):  # served and engine side by side, so drifting load hits both
                for n in args.streams:
                    served[n].append(run_clients(url, prompts[:n], args.tokens))
                    t0 = time.perf_counter()
                    new = generate(model, ids[:n], args.tokens)
                    engine[n].append(sum(map(len, new)) / (time.perf_counter() - t0))
        finally:
            proc.terminate()
            proc.wait()
    print(f"{datetime.date.today()}, {args.backend}, {args.model} shapes (random init, float32), {args.tokens} new "
          f"tokens per stream, book test prompts {min(map(len, ids))}-{max(map(len, ids))} tokens, "
          f"{os.cpu_count()} CPUs\n")
    print("| concurrent streams | aggregate tokens/s | per-stream tokens/s | mean first token | "
          "engine alone, batched generate() | served / engine |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.streams:
        med = lambda key, n=n: statistics.median(r[key] for r in served[n])  # noqa: E731
        ratio = statistics.median(r["aggregate"] / e for r, e in zip(served[n], engine[n]))
        print(f"| {n} | {med('aggregate'):.1f} | {med('per_stream'):.1f} | {med('first_token') * 1e3:.0f} ms | "
              f"{statistics.median(engine[n]):.1f} tokens/s | {ratio:.2f} |")

if __name__ == "__main__":
    main()
