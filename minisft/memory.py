"""Memory: what a fine-tuning step holds, estimated part by part before any work, and measured.

The estimate counts the arrays the engine allocates (float32 unless the model is float64):

    weights      every parameter, a LoRA run's adapters included (and, under bfloat16, its bf16
                 copy for the matmuls)
    gradients    every trained parameter (the backward accumulates whole-tensor gradients); in a LoRA
                 run the adapters' only, as the frozen base gets none; with --fused-update only the
                 largest scatter-added buffer (the head, or wte + wpe) and one block's gradients at a time
    moments      AdamW's m and v of every trained parameter: 8 bytes each in fp32, 4 in bf16, 2 in
                 8-bit (+ one float32 scale per block of 2048 values for each)
    activations  what the forward keeps for the backward, at the largest micro-batch's token count
                 N: per block and position the family's count (minisft.family: GPT-2's 16 d floats,
                 x, ln_1, qkv 3d, attention output, x2, ln_2, fc 4d, GELU 4d), +2 d with dropout masks;
                 with --grad-checkpoint only the block's input (d) plus one recomputed block at a time;
                 LoRA adds each adapter's (N, r) down-projection and, with --lora-dropout, each adapted
                 module's dropped input and mask
    scratch      the backward's transients (one block's activation gradients, GPT-2's about 12 N d),
                 the head's logit chunk and, when the head trains, its weight-gradient scratch (V x d)
    runtime      the interpreter, numpy/numba/BLAS and compiled kernels: a measured constant

The measured figure is the whole process's peak resident set (getrusage), and on CUDA torch's peak
allocated device memory.
"""
import math
import os
import resource
import sys

import numpy as np

from . import lora
from .backends.constants import HEAD_CHUNK_BYTES, STORE_DTYPES
from .backends.optim_state import DEFAULT, FORMATS
from .config import GPTConfig
from .errors import MinisftError
from .family import family_of, param_shapes
from .llama import LlamaConfig

GB = 1e9
RUNTIME_BYTES = 0.45e9      # measured: a gpt2-tiny numba run's peak RSS less its arrays


def estimate(cfg: GPTConfig | LlamaConfig, tokens: int, dtype="float32", optim_state=DEFAULT, grad_checkpoint=False,
             fused_update=False, lora_config: lora.LoraConfig | None = None) -> dict:
    """Estimated bytes per part (module doc) for a step over `tokens` positions. lora_config: a LoRA
    run's adapters (the base weights frozen: only the adapters get gradients and moments)."""
    shapes = param_shapes(cfg)
    adapters = lora.plan(cfg, lora_config) if lora_config is not None else []
    trained = [p.n_in * p.rank for p in adapters] + [p.rank * p.n_out for p in adapters]  # each A, B
    sizes = trained or [math.prod(s) for s in shapes.values()]
    store = np.dtype(STORE_DTYPES[dtype])  # weights, gradients, activations (bfloat16 stores float32)
    width = store.itemsize
    n_base = sum(math.prod(s) for s in shapes.values())
    n_all = n_base + sum(trained)
    n_trained = sum(sizes)
    fam = family_of(cfg)
    if fused_update:
        block = sum(math.prod(s) for n, s in shapes.items() if n.startswith(fam.layer.format(0)))
        tables = sum(math.prod(shapes[n]) for n in (fam.embed, fam.positions) if n is not None)
        buffers = max(tables, math.prod(shapes.get("lm_head.weight", (0,))))
        grads = min(n_trained, buffers + block)
    else:
        grads = n_trained
    moments = sum(FORMATS[optim_state].nbytes(s, store) for s in sizes)
    d, L = cfg.emb_dim, cfg.n_layers
    per_block = fam.kept(cfg) + (2 * d if cfg.drop_rate > 0 else 0)  # floats per position
    kept = L * tokens * d + tokens * per_block if grad_checkpoint else L * tokens * per_block
    # A frozen head computes no dW, so the head's (V, d) weight-gradient scratch exists only when it trains.
    head = (0 if adapters else cfg.vocab_size * d * width) + min(HEAD_CHUNK_BYTES, tokens * cfg.vocab_size * width)
    copies = 2 * n_all if dtype == "bfloat16" else 0  # each weight's bf16 copy, kept between its updates
    return dict(weights=n_all * width + copies, gradients=grads * width, moments=moments,
                activations=(kept + 4 * tokens * d + adapter_activations(adapters, lora_config, tokens)) * width,
                scratch=fam.scratch(cfg) * tokens * width + head, runtime=RUNTIME_BYTES)


def adapter_activations(adapters: list, lora_config: lora.LoraConfig | None, tokens: int) -> int:
    """Floats the adapters keep for the backward: each part's down-projection (N, r), and with
    --lora-dropout each adapted module's dropped input and mask (N, in), for every layer (an upper
    bound under --grad-checkpoint, which recomputes them)."""
    if not adapters:
        return 0
    dropped = {p.module: p.n_in for p in adapters} if lora_config.dropout > 0 else {}
    return tokens * (sum(p.rank for p in adapters) + 2 * sum(dropped.values()))


def batch_tokens_bound(lengths, batch_size: int, max_len: int) -> int:
    """The most positions any micro-batch can hold: its batch_size longest examples, each truncated
    to max_len (packed batches hold no padding)."""
    longest = sorted((min(n, max_len) for n in lengths), reverse=True)[:batch_size]
    return int(sum(longest))


def available_bytes() -> int | None:
    """Memory a new allocation can get without swapping: MemAvailable on Linux, else physical RAM."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def cuda_available_bytes(device: str) -> int:
    import torch  # only for a torch run on CUDA
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return free


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def cuda_peak_bytes(backend) -> int | None:
    """torch's peak allocated memory on the backend's CUDA device, None for any other backend."""
    device = getattr(backend, "device", None)
    if getattr(device, "type", None) != "cuda":
        return None
    import torch
    return int(torch.cuda.max_memory_allocated(device))


def format_plan(parts: dict) -> str:
    total = sum(parts.values())
    rows = [f"  {name:<12} {b / GB:8.2f} GB" for name, b in parts.items()]
    return "\n".join(["estimated memory per part:"] + rows + [f"  {'total':<12} {total / GB:8.2f} GB"])


def verdict(parts: dict, available: int | None, where: str) -> str:
    """One line: whether the parts fit in `available` bytes, and by how much."""
    total = sum(parts.values())
    if available is None:
        return f"fit unknown: an estimated {total / GB:.1f} GB; the memory available on {where} cannot be read"
    margin = abs(available - total) / GB
    if total <= available:
        return f"fits: {total / GB:.1f} GB of {available / GB:.1f} GB available on {where}, {margin:.1f} GB to spare"
    return f"does not fit: {total / GB:.1f} GB of {available / GB:.1f} GB available on {where}, {margin:.1f} GB short"


def check_fits(parts: dict, available: int | None, where: str, settings, estimate_with) -> None:
    """Raise MinisftError naming what to change when the parts do not fit in `available` bytes.
    estimate_with(**changes) re-estimates with other settings, for the suggestions."""
    total = sum(parts.values())
    if available is None or total <= available:
        return
    tips = []
    if not settings.grad_checkpoint:
        alt = estimate_with(grad_checkpoint=True)
        tips.append(f"--grad-checkpoint (activations {parts['activations'] / GB:.1f} -> "
                    f"{alt['activations'] / GB:.1f} GB, about 1/3 more compute)")
    # A LoRA run's gradients and moments are the adapters' (a few MB): the lean options do not apply.
    lean = settings.lora_rank is None
    fusable = lean and settings.grad_accum == 1 and settings.grad_clip is None
    if not settings.fused_update and fusable:
        alt = estimate_with(fused_update=True)
        tips.append(f"--fused-update (gradients {parts['gradients'] / GB:.1f} -> {alt['gradients'] / GB:.1f} GB)")
    if settings.optim_state != "8bit" and lean:
        alt = estimate_with(optim_state="8bit")
        tips.append(f"--optim-state 8bit (moments {parts['moments'] / GB:.1f} -> {alt['moments'] / GB:.1f} GB)")
    if settings.batch_size > 1:
        half = settings.batch_size // 2
        alt = estimate_with(batch_size=half)
        tips.append(f"--batch-size {half} --grad-accum {settings.grad_accum * 2} (the same optimizer step; "
                    f"activations -> {alt['activations'] / GB:.1f} GB)")
    best = estimate_with(grad_checkpoint=True, optim_state="8bit" if lean else settings.optim_state,
                         fused_update=fusable or settings.fused_update)
    tips.append(f"all of these but the batch split: {sum(best.values()) / GB:.1f} GB")
    raise MinisftError(f"setting memory_check: the run needs an estimated {total / GB:.1f} GB ("
                       + ", ".join(f"{k} {b / GB:.1f}" for k, b in parts.items())
                       + f") but {where} has {available / GB:.1f} GB available. Try: " + "; ".join(tips)
                       + ". Or pass --no-memory-check to start anyway")
