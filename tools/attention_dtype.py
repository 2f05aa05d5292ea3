"""Where torch's CPU flash attention is faster in float32 than in bfloat16: the evidence for the torch
backend's CPU_FLASH_F32_MAX_LEN. Forward + backward, best of --reps, for each shape: the kernel alone
on contiguous (S, H, L, hd) inputs, and the backend's attention_forward + attention_backward on packed
bf16 rows (casts and padding included) with the limit set above and below the length.

    python tools/attention_dtype.py [--shapes 8x64 4x128 2x256 2x384 2x512 1x768] [--reps 10]
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minisft.backends import torch_backend as tb  # noqa: E402

H, HD = 12, 64  # gpt2-small's heads


def best_ms(fn, reps):
    fn()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def kernel_alone(S, L, dtype, reps):
    q, k, v, do = (torch.randn(S, H, L, HD, dtype=dtype) for _ in range(4))  # (S, H, L, hd) each
    scale = 1.0 / math.sqrt(HD)

    def fwd_bwd():
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(do, q, k, v, o, lse, 0.0, True,
                                                                             scale=scale)
    return best_ms(fwd_bwd, reps)


def through_backend(S, L, in_float32, reps):
    B = tb.TorchBackend("bfloat16", "cpu")
    cu = torch.arange(0, S * L + 1, L)                                    # (S + 1,) every sequence L long
    qkv = torch.randn(S * L, 3 * H * HD, dtype=torch.bfloat16)            # (N, 3d)
    dout = torch.randn(S * L, H * HD, dtype=torch.bfloat16)               # (N, d)
    limit = tb.CPU_FLASH_F32_MAX_LEN
    tb.CPU_FLASH_F32_MAX_LEN = L if in_float32 else L - 1
    try:
        def fwd_bwd():
            out, ctx = B.attention_forward(qkv, cu, H, L)
            B.attention_backward(dout, qkv, out, ctx, cu, H, L)
        return best_ms(fwd_bwd, reps)
    finally:
        tb.CPU_FLASH_F32_MAX_LEN = limit


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["8x64", "4x128", "2x256", "2x384", "2x512", "1x768"],
                    help="sequences x tokens")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {H} heads of {HD}; "
          f"CPU_FLASH_F32_MAX_LEN = {tb.CPU_FLASH_F32_MAX_LEN}\n")
    print("| sequences x tokens | kernel f32 | kernel bf16 | bf16 / f32 | backend f32 | backend bf16 | bf16 / f32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for shape in args.shapes:
        S, L = (int(x) for x in shape.split("x"))
        k32, k16 = (kernel_alone(S, L, dt, args.reps) for dt in (torch.float32, torch.bfloat16))
        b32, b16 = (through_backend(S, L, f32, args.reps) for f32 in (True, False))
        print(f"| {S} x {L} | {k32:.2f} ms | {k16:.2f} ms | {k16 / k32:.2f} | {b32:.2f} ms | {b16:.2f} ms "
              f"| {b16 / b32:.2f} |")


if __name__ == "__main__":
    main()
