"""Every backend kernel on gpt2-small shapes (B=8 sequences of T=64: N=512 positions, d=768,
H=12, V=50257), float32, each backend on the same random inputs, on the CPU.

    python -m pytest benchmarks/test_kernels.py --benchmark-group-by=group --benchmark-columns=min,median,rounds

Rounds: MINISFT_BENCH_ROUNDS (default 5) after one warm-up call (numba compiles, or loads its
cache, there). Not part of the test suite (pyproject's testpaths is tests/ only).
"""
import os

import numpy as np
import pytest

from tests.helpers import ALL_BACKENDS, backend_or_skip

N_SEQ, T, D, H, V = 8, 64, 768, 12, 50257
N = N_SEQ * T
ROUNDS = int(os.environ.get("MINISFT_BENCH_ROUNDS", "5"))


def inputs(B, rng):
    """Backend arrays for every kernel, built once per backend from the same float64 draws."""
    f = B.from_numpy
    cu = np.arange(0, N + 1, T)
    qkv = rng.normal(size=(N, 3 * D))
    x = rng.normal(size=(N, D))
    h4 = rng.normal(size=(N, 4 * D))
    targets = rng.integers(0, V, N)
    a = dict(
        tokens=B.index(rng.integers(0, V, N)), positions=B.index(np.tile(np.arange(T), N_SEQ)),
        wte=f(rng.normal(0, 0.02, (V, D))), wpe=f(rng.normal(0, 0.02, (1024, D))),
        x=f(x), dx=f(rng.normal(size=(N, D))), w=f(1 + 0.1 * rng.normal(size=D)), b=f(rng.normal(size=D)),
        w_fc=f(rng.normal(0, 0.02, (D, 4 * D))), b_fc=f(np.zeros(4 * D)), h4=f(h4), dh4=f(rng.normal(size=(N, 4 * D))),
        qkv=f(qkv), cu=B.index(cu), targets=B.index(targets),
        p=f(rng.normal(0, 0.02, (D, 4 * D))), g=f(rng.normal(0, 1e-3, (D, 4 * D))),
        m=f(rng.normal(0, 1e-4, (D, 4 * D))), v=f(rng.random((D, 4 * D)) * 1e-6),
        p_wte=f(rng.normal(0, 0.02, (V, D))), g_wte=f(rng.normal(0, 1e-3, (V, D))),
        m_wte=f(rng.normal(0, 1e-4, (V, D))), v_wte=f(rng.random((V, D)) * 1e-6),
    )
    a["ln"] = B.layernorm_forward(a["x"], a["w"], a["b"])
    a["att"] = B.attention_forward(a["qkv"], a["cu"], H, T)
    a["dwte"], a["dwpe"] = B.zeros_like(a["wte"]), B.zeros_like(a["wpe"])
    a["dw_head"] = B.zeros_like(a["wte"])
    return a


KERNELS = {
    "embedding_forward": lambda B, a: B.embedding_forward(a["tokens"], a["positions"], a["wte"], a["wpe"]),
    "embedding_backward": lambda B, a: B.embedding_backward(a["dwte"], a["dwpe"], a["dx"], a["tokens"], a["positions"]),
    "layernorm_forward": lambda B, a: B.layernorm_forward(a["x"], a["w"], a["b"]),
    "layernorm_backward": lambda B, a: B.layernorm_backward(a["dx"], a["x"], a["w"], a["ln"][1], a["ln"][2]),
    "linear_forward c_fc": lambda B, a: B.linear_forward(a["x"], a["w_fc"], a["b_fc"]),
    "linear_backward c_fc": lambda B, a: B.linear_backward(a["dh4"], a["x"], a["w_fc"]),
    "attention_forward": lambda B, a: B.attention_forward(a["qkv"], a["cu"], H, T),
    "attention_backward": lambda B, a: B.attention_backward(a["dx"], a["qkv"], a["att"][0], a["att"][1], a["cu"], H, T),
    "gelu_forward": lambda B, a: B.gelu_forward(a["h4"]),
    "gelu_backward": lambda B, a: B.gelu_backward(a["dh4"], a["h4"]),
    "residual_forward": lambda B, a: B.residual_forward(a["x"], a["dx"]),
    "head_loss": lambda B, a: B.head_loss(a["x"], a["wte"], a["targets"], dw=a["dw_head"], grad_scale=1.0 / N),
    "head_loss eval": lambda B, a: B.head_loss(a["x"], a["wte"], a["targets"]),
    "adamw_step c_fc": lambda B, a: B.adamw_step(a["p"], a["g"], a["m"], a["v"], 5e-5, 0.9, 0.999, 1e-8, 0.1, 3),
    "adamw_step wte": lambda B, a: B.adamw_step(a["p_wte"], a["g_wte"], a["m_wte"], a["v_wte"], 5e-5, 0.9, 0.999,
                                                1e-8, 0.1, 3),
    "global_norm": lambda B, a: B.global_norm([a["p_wte"], a["p"]]),
}

_cache = {}


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_kernel(benchmark, backend, kernel):
    B = backend_or_skip(backend, "float32")
    if backend not in _cache:
        _cache.clear()  # one backend's inputs alive at a time
        _cache[backend] = inputs(B, np.random.default_rng(0))
    a = _cache[backend]
    benchmark.group = kernel
    benchmark.extra_info.update(backend=backend, shapes=f"N={N} d={D} H={H} V={V}")
    fn = KERNELS[kernel]
    benchmark.pedantic(lambda: fn(B, a), rounds=ROUNDS, iterations=1, warmup_rounds=1)
