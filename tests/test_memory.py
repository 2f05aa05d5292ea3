"""Memory options: activation checkpointing, lean AdamW state (bf16, 8-bit block-wise), the memory plan."""
import numpy as np
import pytest

from minisft import GPT, GPTConfig
from minisft.model import param_shapes
from tests.backend_util import ALL_BACKENDS, backend_or_skip
from tests.test_model import book_like_batch

TINY = dict(vocab_size=61, context_length=24, emb_dim=16, n_layers=3, n_heads=2)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("drop_rate", [0.0, 0.3])
def test_checkpointed_backward_equals_the_plain_backward_bitwise(backend, drop_rate):
    """float64, with and without dropout: recomputing each block from its kept input (and the RNG
    state there) repeats the same arithmetic, so loss, every gradient and the RNG afterwards are
    bit-identical to keeping every activation."""
    backend_or_skip(backend, "float64")
    cfg = GPTConfig(**TINY, drop_rate=drop_rate)
    rng = np.random.default_rng(5)
    inputs, targets = book_like_batch(rng, cfg.vocab_size, [9, 4, 13])
    runs = []
    for checkpoint in (False, True):
        model = GPT(cfg, backend=backend, dtype="float64", seed=7)
        model.grad_checkpoint = checkpoint
        loss, grads = model.loss_and_grad(inputs, targets)
        runs.append((loss, grads, model.rng.random()))
    (loss0, g0, r0), (loss1, g1, r1) = runs
    assert loss1 == loss0 and r1 == r0
    assert set(g1) == set(g0) == set(param_shapes(cfg))
    for n in g0:
        np.testing.assert_array_equal(g1[n], g0[n], err_msg=n)
