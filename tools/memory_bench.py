"""Peak memory and step time of full fine-tuning with each memory option, one configuration per process.

    python tools/memory_bench.py gpt2-medium --grad-checkpoint --optim-state 8bit >> results.jsonl

Random init, B sequences of T random tokens (every target valid), the book's AdamW (lr 5e-5, wd 0.1),
`--steps` optimizer steps. Prints one JSON line: the estimate of minisft.memory beside the measured
whole-process peak RSS (getrusage), the build time and every step's time. Run each configuration in
a fresh process so the peak is its own; on a shared machine run it under the benchmark lock.
"""
import argparse
import json
import time

import numpy as np

from minisft.batch import pack_padded
from minisft.bench import LR, WEIGHT_DECAY, random_batch
from minisft.pretrained import requested_config
from minisft.memory import estimate, peak_rss_bytes
from minisft.model import GPT
from minisft.optim import OPTIM_STATES, AdamW


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--backend", default="numba")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--optim-state", default="fp32", choices=OPTIM_STATES)
    p.add_argument("--fused-update", action="store_true")
    a = p.parse_args()

    cfg = requested_config(a.model)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    model = GPT(cfg, backend=a.backend, dtype=a.dtype, seed=0)
    model.grad_checkpoint = a.grad_checkpoint
    opt = AdamW(model, lr=LR, weight_decay=WEIGHT_DECAY, state=a.optim_state)
    build_s = time.perf_counter() - t0
    build_rss = peak_rss_bytes()
    times, losses = [], []
    for _ in range(a.steps):
        batch = pack_padded(*random_batch(cfg, a.batch_size, a.seq_len, rng), strip=False)
        t0 = time.perf_counter()
        if a.fused_update:
            loss = opt.fused_step(batch)[0]
        else:
            model.zero_grad()
            loss_sum, n = model.forward_backward(batch)
            opt.step()
            loss = loss_sum / n
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    parts = estimate(cfg, a.batch_size * a.seq_len, a.dtype, a.optim_state, a.grad_checkpoint, a.fused_update)
    print(json.dumps(dict(model=a.model, backend=a.backend, dtype=a.dtype, batch_size=a.batch_size, seq_len=a.seq_len,
                          grad_checkpoint=a.grad_checkpoint, optim_state=a.optim_state, fused_update=a.fused_update,
                          params=model.num_params(), build_s=round(build_s, 1),
                          step_s=[round(t, 2) for t in times], losses=[round(x, 4) for x in losses],
                          build_peak_rss_gb=round(build_rss / 1e9, 2), peak_rss_gb=round(peak_rss_bytes() / 1e9, 2),
                          estimate_gb={k: round(v / 1e9, 2) for k, v in parts.items()},
                          estimate_total_gb=round(sum(parts.values()) / 1e9, 2))), flush=True)


if __name__ == "__main__":
    main()
