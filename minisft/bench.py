"""`minisft bench`: time full training steps (forward + backward + AdamW) on random data.

Reports tokens/s and the process's peak resident memory. It measures one backend at a time; the
cross-backend comparisons with ratios live in benchmarks/ (pytest-benchmark).
"""
import resource
import time

import numpy as np

from .batch import pack_padded
from .config import PRESETS, GPTConfig
from .errors import MinisftError
from .model import GPT
from .optim import AdamW


def time_train_steps(model: GPT, batch_size: int, seq_len: int, steps: int, warmup: int = 1, seed: int = 0):
    """Run warmup + steps AdamW steps on random (batch_size, seq_len) batches; returns
    (seconds per step, tokens per second) over the timed steps."""
    rng = np.random.default_rng(seed)
    opt = AdamW(model)
    times = []
    for i in range(warmup + steps):
        x = rng.integers(0, model.cfg.vocab_size, size=(batch_size, seq_len))  # (B, T)
        y = rng.integers(0, model.cfg.vocab_size, size=(batch_size, seq_len))  # (B, T)
        batch = pack_padded(x, y, strip=False)
        t0 = time.perf_counter()
        model.zero_grad()
        model.forward_backward(batch)
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    return sec, batch_size * seq_len / sec


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def run(args) -> int:
    cfg = GPTConfig.preset(args.model)
    try:
        model = GPT(cfg, backend=args.backend, dtype=args.dtype, device=args.device, seed=0)
    except (ValueError, ImportError) as e:  # an unknown backend or dtype, torch or the device missing
        raise MinisftError(f"bench: {e}") from e
    sec, tok_s = time_train_steps(model, args.batch_size, args.seq_len, args.steps, args.warmup)
    print(f"{args.model} backend={args.backend} dtype={args.dtype} B={args.batch_size} T={args.seq_len}: "
          f"{sec * 1000:.1f} ms/step, {tok_s:,.0f} tokens/s, peak RSS {peak_rss_mb():,.0f} MB "
          f"(median of {args.steps} steps after {args.warmup} warm-up)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="time training steps (forward+backward+AdamW) on random data")
    p.add_argument("--model", default="gpt2-small", choices=list(PRESETS))
    p.add_argument("--backend", default="numpy")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.set_defaults(func=run)
