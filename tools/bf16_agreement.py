"""Per-step training loss of the numba backend in bfloat16 against float32: the book's recipe (its data,
Alpaca prompts, batch 8, AdamW lr 5e-5, weight decay 0.1) from the same random init, the same batches.

    python tools/bf16_agreement.py [--model gpt2-small --steps 50 --max-length 64]

The condition for `--dtype auto` choosing bfloat16 on numba: every step's loss within 1% of float32's
(tests/test_numba_bf16.py checks the same on gpt2-tiny). Prints a markdown table and the largest and
mean relative differences.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minisft.settings import Settings, validate  # noqa: E402
from minisft.train import finetune  # noqa: E402


def step_losses(out: Path) -> list:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--max-length", type=int, default=64, help="sequences cut to this many tokens (time)")
    args = ap.parse_args()
    losses, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            s = validate(Settings(model=args.model, init="random", backend="numba", dtype=dtype, max_steps=args.steps,
                                  max_length=args.max_length, eval_freq=10**6, eval_iter=1, responses=0,
                                  out=str(Path(tmp) / dtype)))
            t0 = time.perf_counter()
            finetune(s, log=lambda *_: None)
            seconds[dtype] = time.perf_counter() - t0
            losses[dtype] = step_losses(Path(s.out))
    rel = [abs(b - f) / abs(f) for f, b in zip(losses["float32"], losses["bfloat16"])]
    shown = sorted({1, 10, args.steps // 2, args.steps} & set(range(1, args.steps + 1)))
    print("| step | " + " | ".join(map(str, shown)) + " |\n|---|" + "---:|" * len(shown))
    for dtype in ("float32", "bfloat16"):
        print(f"| {dtype} loss | " + " | ".join(f"{losses[dtype][i - 1]:.4f}" for i in shown) + " |")
    worst = max(range(len(rel)), key=rel.__getitem__)
    print(f"\nlargest relative difference {rel[worst]:.2%} (step {worst + 1}), mean {sum(rel) / len(rel):.2%}; "
          f"wall time float32 {seconds['float32']:.0f} s, bfloat16 {seconds['bfloat16']:.0f} s")


if __name__ == "__main__":
    main()
