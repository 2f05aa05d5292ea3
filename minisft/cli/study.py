"""`minisft study OP`: backprop through one op of GPT-2 or the Llama family (or a whole block, or the
GPT-2 model), stage by stage, on tiny float64 inputs: every intermediate with its shape, each stage's
forward and the backward that undoes it, and a finite-difference check of every gradient (see
minisft.study); `study adamw` and `study step` walk the update and a whole training step beside
PyTorch. --kernel FILE:FUNCTION checks your own backward (docs/exercises/). Exit status 1 when a check
fails."""
import importlib.util
import sys

from ..errors import MinisftError
from ..study import (GPT2_SHAPE, GROUPED_OPS, KV_HEADS, LLAMA_OPS, LLAMA_SHAPE, OPS, PEER_OPS, KernelFailed,
                     adamw_walk, format_study, load_kernel, step_walk, study, torch_gradients)


def _lengths(text: str) -> list:
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise MinisftError(f"study: --lengths takes comma-separated integers like 4,3, not {text!r}") from None


def run(args) -> int:
    if args.torch and importlib.util.find_spec("torch") is None:
        raise MinisftError("study: --torch needs PyTorch: pip install 'minisft[torch]'")
    if args.op in PEER_OPS:
        if args.kernel or args.kv_heads is not None:
            raise MinisftError(f"study: {args.op} takes no --kernel or --kv-heads")
        lines, checks = (adamw_walk(args.seed) if args.op == "adamw" else
                         step_walk(args.seed, _lengths(args.lengths), args.heads or GPT2_SHAPE[0],
                                   args.head_dim or GPT2_SHAPE[1]))
        print("\n".join(lines))
        return 0 if all(c.ok for c in checks) else 1
    kernel = load_kernel(args.kernel) if args.kernel else None
    try:
        s = study(args.op, seed=args.seed, lengths=_lengths(args.lengths), heads=args.heads,
                  head_dim=args.head_dim, kv_heads=args.kv_heads, kernel=kernel)
    except KernelFailed as e:  # the learner's kernel broke: a failed check (exit 1), not bad input
        print(f"minisft: {e}", file=sys.stderr)
        return 1
    print("\n".join(format_study(s, torch_gradients(s) if args.torch else None, values=not args.no_values)))
    return 0 if all(c.ok for c in s.checks) else 1


def register(sub) -> None:
    p = sub.add_parser("study", help="backprop through one op, stage by stage, each gradient checked",
                       description=__doc__)
    p.add_argument("op", choices=OPS + PEER_OPS, help="the op to walk through (adamw, step: beside PyTorch)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs and output gradient")
    p.add_argument("--lengths", default="4,3", help="packed sequence lengths, comma-separated")
    p.add_argument("--heads", type=int, help=f"attention heads H (default {GPT2_SHAPE[0]}; {LLAMA_SHAPE[0]} for "
                   f"{', '.join(LLAMA_OPS)})")
    p.add_argument("--head-dim", type=int, help=f"width of one head hd, d = H * hd (default {GPT2_SHAPE[1]}; "
                   f"{LLAMA_SHAPE[1]} for the Llama ops)")
    p.add_argument("--kv-heads", type=int, help=f"key/value heads Hkv of {', '.join(GROUPED_OPS)}, dividing H "
                   f"(default {KV_HEADS})")
    p.add_argument("--torch", action="store_true", help="add PyTorch autograd's gradients side by side")
    p.add_argument("--kernel", metavar="FILE:FUNCTION",
                   help="check your own backward in place of the numpy backend's FUNCTION (same arguments, "
                   "no self), e.g. docs/exercises/2_layernorm.py:layernorm_backward")
    p.add_argument("--no-values", action="store_true", help="shapes, formulas and errors only, no arrays")
    p.set_defaults(func=run)
