"""Data-parallel on one CPU machine: 2 processes x 1 thread (torchrun, gloo) against 1 process x 2
threads, by training throughput, and the bytes every step all-reduces per model size.

    flock /tmp/minisft-bench.lock python tools/bench_dp.py [--models gpt2-tiny gpt2-small]
                                                          [--backends numba torch] [--steps 8] [--rounds 1]

Each contender is `minisft finetune` (random init, the book's data and batch 8, no evaluation or
responses) run twice, for 1 and for 1 + steps optimizer steps, in fresh processes; the difference
of the two runs' training seconds (summary.json) is the steady-state time of `steps` steps, without
start-up, the first step's warm-up (numba's cache load, torch's first calls) or the final export.
Rounds rotate the order of the contenders so drifting load hits both alike.
"""
import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minisft.config import PRESETS, GPTConfig  # noqa: E402
from minisft.model import param_shapes  # noqa: E402

DATA = ROOT / "minisft" / "assets" / "instruction-data.json"  # the book's records, as bundled
CONTENDERS = {  # name -> (launcher argv before `-m minisft`, threads per process)
    "1 process x 2 threads": ([sys.executable], 2),
    "2 processes x 1 thread (torchrun, gloo)": ([sys.executable, "-m", "torch.distributed.run",
                                                 "--nproc-per-node", "2"], 1),
}


def run(launcher, threads, backend, model, steps, out) -> tuple:
    """-> (training seconds, tokens seen) of one `minisft finetune` run of `steps` steps."""
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [*launcher, "-m", "minisft", "finetune", "--model", model, "--init", "random", "--data", str(DATA),
           "--backend", backend, "--max-steps", str(steps), "--eval-freq", "100000", "--responses", "0",
           "--ckpt-every", "100000", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    return summary["train_seconds"], summary["tokens_seen"]


def allreduce_bytes(model: str, dtype_bytes: int = 4) -> int:
    """Bytes of the gradients one step all-reduces: every trained tensor (full fine-tuning)."""
    return sum(dtype_bytes * math.prod(s) for s in param_shapes(GPTConfig.preset(model)).values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["gpt2-tiny", "gpt2-small"])
    ap.add_argument("--backends", nargs="+", default=["numba", "torch"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    print(f"{datetime.date.today()}, {os.cpu_count()} CPUs, {args.steps} steady-state steps of batch 8\n")
    print("| model | backend | contender | tokens/s | step (s) | vs 1 process |")
    print("|---|---|---|---:|---:|---:|")
    for model in args.models:
        for backend in args.backends:
            results = {name: [] for name in CONTENDERS}
            names = list(CONTENDERS)
            for r in range(args.rounds):
                for name in names[r % 2:] + names[:r % 2]:
                    launcher, threads = CONTENDERS[name]
                    with tempfile.TemporaryDirectory() as tmp:
                        t1, n1 = run(launcher, threads, backend, model, 1, Path(tmp) / "a")
                        t2, n2 = run(launcher, threads, backend, model, 1 + args.steps, Path(tmp) / "b")
                    results[name].append(((t2 - t1), n2 - n1))
            base = None
            for name, rs in results.items():
                secs, toks = sum(t for t, _ in rs), sum(n for _, n in rs)
                rate = toks / secs
                base = base or rate
                print(f"| {model} | {backend} | {name} | {rate:,.0f} | {secs / (len(rs) * args.steps):.3f} | "
                      f"{rate / base:.2f}x |", flush=True)
    print("\n| model | parameters | bytes all-reduced per step (float32 gradients) | each rank sends (and "
          "receives), ring, 2 ranks | 8 ranks |")
    print("|---|---:|---:|---:|---:|")
    for model in PRESETS:
        b = allreduce_bytes(model)
        ring = lambda w, b=b: 2 * (w - 1) / w * b  # noqa: E731 (reduce-scatter then all-gather)
        print(f"| {model} | {b // 4:,} | {b / 2**20:,.1f} MiB | {ring(2) / 2**20:,.1f} MiB | "
              f"{ring(8) / 2**20:,.1f} MiB |")


if __name__ == "__main__":
    main()
