"""Train-step throughput: the torch backend against a PyTorch-autograd GPT-2 on the same device, in
the same run. The peer is minisft/peer.py (the model written the ordinary way) with
torch.optim.AdamW at its defaults; under bfloat16 it runs in torch.autocast with float32 weights,
as ours keeps float32 master weights.

    MINISFT_BENCH_DEVICE=cpu MINISFT_BENCH_DTYPE=float32 \\
        python -m pytest benchmarks/test_torch_step.py --benchmark-group-by=param:model

One step = clear gradients, forward, backward, AdamW update and reading the loss back (the step's
one host sync), on B=8 sequences of T=64 tokens, every target valid. tokens/s = B*T / median step
time, kept in each result's extra_info. Rounds: MINISFT_BENCH_ROUNDS, else 5 on a GPU and, the CPU
being slow, 3 for gpt2-small and 2 for gpt2-medium (after one warm-up step).
"""
import gc
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'minisft[torch]')")

from minisft import GPT, AdamW, GPTConfig, pack_padded  # noqa: E402
from minisft.peer import TorchGPT  # noqa: E402

DEVICE = os.environ.get("MINISFT_BENCH_DEVICE", "cpu")
DTYPE = os.environ.get("MINISFT_BENCH_DTYPE", "float32")
B, T = 8, 64


def rounds(model: str) -> int:
    if "MINISFT_BENCH_ROUNDS" in os.environ:
        return int(os.environ["MINISFT_BENCH_ROUNDS"])
    if DEVICE != "cpu":
        return 5
    return 3 if model == "gpt2-small" else 2


def random_batch(cfg):
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, (B, T))  # (B, T)
    y = rng.integers(0, cfg.vocab_size, (B, T))  # (B, T)
    return x, y


def minisft_step(cfg):
    model = GPT(cfg, backend="torch", dtype=DTYPE, device=DEVICE, seed=0)
    opt = AdamW(model)
    batch = pack_padded(*random_batch(cfg), strip=False)
    info = {"attention": model.B.attention_path(cfg.head_dim)[0]}

    def step():
        model.zero_grad()
        model.forward_backward(batch)  # ends with the loss read back: the step's sync
        opt.step()
    return step, info


def autograd_step(cfg):
    peer = TorchGPT(cfg, device=DEVICE)
    with torch.no_grad():
        for p in peer.parameters():
            p.normal_(0.0, 0.02)
    opt = torch.optim.AdamW(peer.parameters(), lr=5e-5, weight_decay=0.1)
    x, y = (torch.from_numpy(a).to(DEVICE) for a in random_batch(cfg))
    bf16 = DTYPE == "bfloat16"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16, enabled=bf16):
            loss = peer.loss(x, y)
        loss.backward()
        opt.step()
        loss.item()
    return step, {}


@pytest.mark.parametrize("engine", ["minisft-torch", "autograd-peer"])
@pytest.mark.parametrize("model", ["gpt2-small", "gpt2-medium"])
def test_train_step(benchmark, model, engine):
    cfg = GPTConfig.preset(model)
    step, info = (minisft_step if engine == "minisft-torch" else autograd_step)(cfg)
    benchmark.extra_info.update(info, device=DEVICE, dtype=DTYPE, batch=f"{B}x{T}")
    benchmark.pedantic(step, rounds=rounds(model), iterations=1, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = round(B * T / benchmark.stats.stats.median, 1)
    del step
    gc.collect()
    if DEVICE.startswith("cuda"):
        torch.cuda.empty_cache()
