"""One command for the end-to-end comparison: prints a markdown table of train-step throughput.

    python tools/bench_table.py [--rounds 3 --steps 3 --kinds numpy numba torch peer]

Every round runs each contender once, each in a fresh process (python -m minisft bench --json),
in an order rotated from round to round, plus one sgemm measurement; a contender's figure is the
median over all its timed steps, so load that drifts during the run hits every contender alike.
Ratios are against the PyTorch-autograd peer measured in the same run. With --compile it also
times numba's first step with an empty kernel cache and with a warm one. --threads N pins every
library (OpenMP/torch, OpenBLAS, MKL, numba) to N threads: on a machine shared with other work,
--threads 1 compares per-core efficiency without the thread-barrier stalls that oversubscription
inflicts, unevenly, on multi-threaded runs.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minisft.bench import KINDS, available, matmul_params  # noqa: E402
from minisft import GPTConfig  # noqa: E402

LABELS = {"numpy": "minisft numpy", "numba": "minisft numba", "torch": "minisft torch (cpu)",
          "peer": "PyTorch autograd (TorchGPT + torch.optim.AdamW)",
          "matmuls": "the step's matmuls alone (numpy sgemm)",
          "peer-malloc": "PyTorch autograd, glibc keeping freed memory (MALLOC_MMAP_MAX_=0, no trim)"}


# glibc's tunables for what backends/numba_backend.py sets with mallopt: no mmap, never trim.
PEER_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**63)}
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def run_json(args, env=None) -> tuple[dict, float]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "minisft", "bench", "--json", "--backend", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"minisft bench {' '.join(args)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1]), wall


def compile_times(common) -> dict:
    """numba's first step with an empty cache (compiles every kernel) and with the cache it left."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        cold, cold_wall = run_json(["numba", "--steps", "1", *common], env)
        warm, warm_wall = run_json(["numba", "--steps", "1", *common], env)
    return dict(cold_first=cold["first_step_s"], warm_first=warm["first_step_s"], step=warm["sec_per_step"],
                cold_wall=cold_wall, warm_wall=warm_wall)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per contender per round")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="also time numba's cold and warm first step")
    ap.add_argument("--peer-malloc", action="store_true",
                    help="add a row: the peer with glibc told to keep freed memory, as the numba backend does")
    ap.add_argument("--threads", type=int, help="threads for every library in every contender (default: "
                    "each library's own default, one per core)")
    args = ap.parse_args()
    if args.threads:
        os.environ.update({v: str(args.threads) for v in THREAD_VARS})

    common = ["--model", args.model, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    kinds = [k for k in args.kinds if not available(k)]
    if args.peer_malloc and "peer" in kinds:
        kinds.append("peer-malloc")
    skipped = {k: available(k) for k in args.kinds if available(k)}
    load_before = os.getloadavg()
    times = {k: [] for k in kinds}
    rss = {k: 0.0 for k in kinds}
    peaks, rates = [], []
    gflop = None
    for r in range(args.rounds):
        order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
        sg, _ = run_json(["sgemm", *common])
        peaks.append(sg["peak"])
        rates.append(sg["rates"])
        for k in order:
            kind, env = (k, None) if k != "peer-malloc" else ("peer", dict(os.environ, **PEER_MALLOC))
            res, _ = run_json([kind, "--steps", str(args.steps), "--warmup", str(args.warmup), *common], env)
            times[k] += res["step_times"]
            rss[k] = max(rss[k], res["peak_rss_mb"])
            gflop = res["step_gflop"]
            print(f"round {r + 1}/{args.rounds} {k}: {np.median(res['step_times']) * 1e3:.0f} ms/step",
                  file=sys.stderr, flush=True)
    comp = compile_times(common) if args.compile and "numba" in kinds else None
    load_after = os.getloadavg()

    peak = float(np.median(peaks))
    cfg = GPTConfig.preset(args.model)
    tokens = args.batch_size * args.seq_len
    sec = {k: float(np.median(v)) for k, v in times.items()}
    print(f"### {args.model} train step, B={args.batch_size} T={args.seq_len}, float32, AdamW "
          f"({datetime.date.today().isoformat()})\n")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
          f"({'LOADED: other work was running' if max(load_before[0], load_after[0]) > 0.5 * os.cpu_count() else 'quiet'}).")
    print(f"Median over {args.rounds} rounds x {args.steps} steps per contender, each round in fresh processes; "
          f"threads: {args.threads or 'library defaults'}.\n")
    print("| contender | ms/step | tokens/s | vs peer | GFLOP/s | MFU | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k in kinds:
        ratio = f"{sec['peer'] / sec[k]:.2f}x" if "peer" in sec else "-"
        gf = gflop / sec[k]
        print(f"| {LABELS[k]} | {sec[k] * 1e3:,.0f} | {tokens / sec[k]:,.1f} | {ratio} | {gf:,.1f} | "
              f"{gf / peak:.1%} | {rss[k]:,.0f} MB |")
    for k, why in skipped.items():
        print(f"| {LABELS[k]} | skipped: {why} | | | | | |")
    print(f"\nsgemm peak {peak:,.1f} GFLOP/s: numpy float32 matmul, best of the step's own shapes "
          f"(median over rounds). Per shape (GFLOP/s, median over rounds):")
    print("  " + ", ".join(f"{s} {np.median([r[s] for r in rates]):.0f}" for s in rates[0]))
    print(f"\nStep FLOPs = 6 * {matmul_params(cfg) / 1e6:.1f}M matmul weights * {tokens} tokens + "
          f"attention 12 * n_layers * d * sum(L^2) = {gflop:.1f} GFLOP.")
    if comp:
        print(f"\nnumba first step: {comp['cold_first']:.1f} s with an empty kernel cache (compiling), "
              f"{comp['warm_first']:.1f} s with the cache warm; steady step {comp['step']:.2f} s. "
              f"Whole process (start, build, 2 steps): cold {comp['cold_wall']:.1f} s, warm {comp['warm_wall']:.1f} s.")


if __name__ == "__main__":
    main()
