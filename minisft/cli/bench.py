"""`minisft bench`: time full training steps (clear gradients, forward, backward, AdamW) of one
contender on random data: tokens/s, achieved GFLOP/s and the process's peak resident memory
(see minisft.bench for the contenders and the FLOP count)."""
import json

from ..bench import KINDS, available, measure, sgemm_peak
from ..config import PRESETS, GPTConfig
from ..errors import MinisftError
from .checks import at_least


def run(args) -> int:
    for name, low in (("batch_size", 1), ("seq_len", 1), ("steps", 1), ("warmup", 0)):
        at_least(args, name, low)
    context = GPTConfig.preset(args.model).context_length
    if args.seq_len > context:
        raise MinisftError(f"--seq-len {args.seq_len} is more than {args.model}'s context of {context} tokens")
    if args.backend == "sgemm":
        out = sgemm_peak(args.model, args.batch_size, args.seq_len)
    else:
        why = available(args.backend)
        if why:
            raise MinisftError(f"bench: {args.backend} cannot run here: {why}")
        out = measure(args.backend, args.model, args.batch_size, args.seq_len, args.steps, args.warmup)
    if args.json:
        print(json.dumps(out))
    elif args.backend == "sgemm":
        print(f"sgemm peak {out['peak']:.1f} GFLOP/s on {args.model}'s matmul shapes")
    else:
        print(f"{args.model} {args.backend} B={args.batch_size} T={args.seq_len}: {out['sec_per_step'] * 1000:,.1f} "
              f"ms/step, {out['tokens_per_s']:,.0f} tokens/s, {out['gflops_per_s']:,.1f} GFLOP/s, peak RSS "
              f"{out['peak_rss_mb']:,.0f} MB (median of {args.steps} steps after {args.warmup} warm-up)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="time training steps (forward+backward+AdamW) on random data",
                       description=__doc__)
    p.add_argument("--backend", default="numba", choices=KINDS + ("sgemm",),
                   help="a minisft backend; peer: PyTorch autograd + torch.optim.AdamW; matmuls: the step's "
                        "matmuls alone (numpy); sgemm: the machine's float32 matmul peak")
    p.add_argument("--model", default="gpt2-small", choices=list(PRESETS), help="model preset (random init)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (numba compiles or loads its cache)")
    p.add_argument("--json", action="store_true", help="print the measurement as one JSON object")
    p.set_defaults(func=run)
