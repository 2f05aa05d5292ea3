"""`minisft bench`: how fast a full training step (clear gradients, forward, backward, AdamW) runs
here, for minisft's backends and dtypes and for PyTorch in its strongest CPU setup, on random data.

With no --backend: the table. Every contender that can run here (by default the numba and torch
backends in float32 and bfloat16 and the three PyTorch peers), each in its own fresh process: ms per
step, tokens/s, ratio to the PyTorch peers, achieved GFLOP/s and MFU against this machine's measured
matmul peak for the contender's dtype, peak memory. With --backend: one contender, measured in this
process (what the table runs in each subprocess). See minisft/bench.py for the contenders and the
FLOP count."""
import json
import sys

from ..bench import CONTENDERS, KINDS, TABLE_DEFAULT, available, bf16_peak, measure, sgemm_peak, table
from ..pretrained import PRESETS, requested_config
from ..errors import MinisftError
from .checks import at_least


def run(args) -> int:
    for name, low in (("batch_size", 1), ("seq_len", 1), ("steps", 1), ("warmup", 0), ("rounds", 1)):
        at_least(args, name, low)
    context = requested_config(args.model).context_length
    if args.seq_len > context:
        raise MinisftError(f"--seq-len {args.seq_len} is more than {args.model}'s context of {context} tokens")
    if args.backend is None:
        for k in args.contenders:
            if k not in KINDS:
                raise MinisftError(f"bench: unknown contender {k!r}; choose among {', '.join(KINDS)}")
        print(table(args.contenders, args.model, args.batch_size, args.seq_len, args.rounds, args.steps,
                    args.warmup, args.threads, progress=lambda m: print(m, file=sys.stderr, flush=True)))
        return 0
    if args.backend in ("sgemm", "bf16gemm"):
        out = (sgemm_peak if args.backend == "sgemm" else bf16_peak)(args.model, args.batch_size, args.seq_len)
    else:
        why = available(args.backend)
        if why:
            raise MinisftError(f"bench: {args.backend} cannot run here: {why}")
        try:
            out = measure(args.backend, args.model, args.batch_size, args.seq_len, args.steps, args.warmup,
                          args.device)
        except ValueError as e:  # a device that is not here
            raise MinisftError(f"bench: {e}") from None
    if args.json:
        print(json.dumps(out))
    elif args.backend in ("sgemm", "bf16gemm"):
        print(f"{args.backend} peak {out['peak'] or 0:,.1f} GFLOP/s on {args.model}'s matmul shapes")
    else:
        print(f"{args.model} {args.backend} B={args.batch_size} T={args.seq_len}: {out['sec_per_step'] * 1000:,.1f} "
              f"ms/step, {out['tokens_per_s']:,.0f} tokens/s, {out['gflops_per_s']:,.1f} GFLOP/s, peak RSS "
              f"{out['peak_rss_mb']:,.0f} MB (median of {args.steps} steps after {args.warmup} warm-up)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="time training steps (forward+backward+AdamW) against PyTorch",
                       description=__doc__)
    p.add_argument("--backend", default=None, choices=KINDS + ("sgemm", "bf16gemm"),
                   help="measure one contender in this process: " + "; ".join(
                       f"{k}: {label}" for k, (label, _) in CONTENDERS.items())
                   + "; sgemm / bf16gemm: the machine's float32 / bfloat16 matmul peak (default: the table)")
    p.add_argument("--contenders", nargs="+", default=list(TABLE_DEFAULT), metavar="NAME",
                   help=f"the table's contenders (default: {' '.join(TABLE_DEFAULT)})")
    p.add_argument("--model", default="gpt2-small", choices=list(PRESETS), help="model preset (random init)")
    p.add_argument("--device", default=None, help="torch device for --backend torch/torch-bf16 (default cpu)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=3, help="timed steps per contender (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (numba compiles or loads its cache)")
    p.add_argument("--rounds", type=int, default=1, help="table: rounds, each running every contender once")
    p.add_argument("--threads", type=int, default=None,
                   help="table: threads for every library in every contender (default: one per core)")
    p.add_argument("--json", action="store_true", help="with --backend: print the measurement as one JSON object")
    p.set_defaults(func=run)
