"""Where a training step's time goes: wall time per backend kernel over a few gpt2-small steps.

    python tools/profile_step.py --backend numba [--batch-size 8 --seq-len 64 --steps 3]

Every method of the backend is wrapped with a timer (the model calls nothing else that does work),
so the table accounts for the whole step; "model + Python" is the step's time outside kernels.
With `--backend numba --dtype bfloat16` the bf16 GEMMs and roundings those kernels call get rows of
their own at the end (time already counted in the kernels' rows): the step's GEMM floor.
On a machine shared with other work, `--clock cpu` counts the process's CPU time instead of wall
time: run it single-threaded (NUMBA_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1) for a profile that other
processes barely disturb.
"""
import argparse
import collections
import functools
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minisft import GPT, AdamW, pack_padded  # noqa: E402
from minisft.pretrained import requested_config  # noqa: E402
from minisft.backends import bf16  # noqa: E402


def page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def instrument(obj, names, totals, counts, faults, clock):
    """Replace each named function of obj (a backend, or a module) with a timer around it."""
    for name in names:
        fn = getattr(obj, name)

        @functools.wraps(fn)
        def timed(*a, _fn=fn, _name=name, **k):
            f0, t0 = page_faults(), clock()
            try:
                return _fn(*a, **k)
            finally:
                totals[_name] += clock() - t0
                counts[_name] += 1
                faults[_name] += page_faults() - f0
        setattr(obj, name, timed)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = ap.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    cfg = requested_config(args.model)
    model = GPT(cfg, backend=args.backend, dtype=args.dtype, seed=0)
    opt = AdamW(model)
    rng = np.random.default_rng(0)
    # the backend's kernels, and the bf16 GEMMs and roundings the numba backend's kernels call inside them
    (totals, counts, faults), inner = ([collections.defaultdict(float), collections.defaultdict(int),
                                        collections.defaultdict(int)] for _ in range(2))

    def step():
        x = rng.integers(0, cfg.vocab_size, size=(args.batch_size, args.seq_len))  # (B, T)
        y = rng.integers(0, cfg.vocab_size, size=(args.batch_size, args.seq_len))  # (B, T)
        model.zero_grad()
        model.forward_backward(pack_padded(x, y, strip=False))
        opt.step()

    step()  # warm-up: compilation, first-touch of every buffer
    methods = [n for n in dir(model.B) if not n.startswith("_") and n != "rng" and callable(getattr(model.B, n))]
    instrument(model.B, methods, totals, counts, faults, clock)
    if args.backend == "numba" and args.dtype == "bfloat16":
        instrument(bf16, ("gemm", "to_bf16"), *inner, clock)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = clock()
    for _ in range(args.steps):
        step()
    wall = (clock() - t0) / args.steps
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    kernels = sum(totals.values()) / args.steps
    print(f"{args.model} {args.backend} {args.dtype} B={args.batch_size} T={args.seq_len} ({args.clock} clock): "
          f"{wall * 1000:.0f} ms/step, {args.batch_size * args.seq_len / wall:.0f} tokens/s; per step "
          f"{(r1.ru_minflt - r0.ru_minflt) / args.steps:.0f} page faults, "
          f"{(r1.ru_utime - r0.ru_utime) / args.steps:.2f} s user and {(r1.ru_stime - r0.ru_stime) / args.steps:.2f} s "
          f"system CPU\n")
    # Page faults per kernel: a block the heap handed back to the kernel costs one fault per 4 kB page
    # at its next first touch (backends/heap.py), time the ms column shows and this one explains.
    print("| kernel | calls/step | ms/step | share | page faults/step |\n|---|---:|---:|---:|---:|")
    for name, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {counts[name] // args.steps} | {t / args.steps * 1000:.1f} | {t / args.steps / wall:.1%} "
              f"| {faults[name] / args.steps:.0f} |")
    print(f"| model + Python | | {(wall - kernels) * 1000:.1f} | {(wall - kernels) / wall:.1%} | |")
    for name, t in sorted(inner[0].items(), key=lambda kv: -kv[1]):  # already counted in the rows above
        print(f"| (inside those) bf16.{name} | {inner[1][name] // args.steps} | {t / args.steps * 1000:.1f} "
              f"| {t / args.steps / wall:.1%} | {inner[2][name] / args.steps:.0f} |")


if __name__ == "__main__":
    main()
