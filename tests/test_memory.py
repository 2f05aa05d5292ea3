"""Memory options: activation checkpointing, lean AdamW state (bf16, 8-bit block-wise), the memory plan."""
import numpy as np
import pytest

from minisft import GPT, GPTConfig
from minisft.backends import quant
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


# ---- the formats: bfloat16 stochastic rounding, 8-bit block-wise codes --------------------------
def test_bf16_stochastic_rounding_picks_a_neighbour_and_is_unbiased():
    """Each result is one of the two bfloat16 neighbours of x; over 64 steps' draws the mean of
    the rounded values is within 0.35 bfloat16 ulp of x for every x (5 sigma of a 64-draw mean)."""
    x = (np.random.default_rng(0).standard_normal(4096) * 10.0 ** np.random.default_rng(1).uniform(-6, 3, 4096)
         ).astype(np.float32)                                                # (n,) signs and magnitudes mixed
    down = quant.bf16_to_f32((x.view(np.uint32) >> 16).astype(np.uint16))     # (n,) toward zero
    ulp = np.abs(quant.bf16_to_f32((x.view(np.uint32) >> 16).astype(np.uint16) + np.uint16(1)) - down)
    rounded = np.stack([quant.bf16_to_f32(quant.bf16_round(x, quant.round_salt(t, 3, 0))) for t in range(64)])
    assert np.all((rounded == down) | (np.abs(rounded - down) == ulp))
    assert np.max(np.abs(rounded.astype(np.float64).mean(axis=0) - x) / ulp) < 0.35
    assert 0.4 < np.mean(rounded != down) < 0.6  # the draws are not stuck on one side


def bracket_half_gap(u, code):
    """Half the gap between the two code entries around each u; below the lowest entry (the signed
    code has no -1: u in [-1, -0.993)) the whole distance to it."""
    code = code.astype(np.float64)
    hi = np.clip(np.searchsorted(code, u, side="left"), 1, len(code) - 1)
    return np.where(u < code[0], code[0] - u, (code[hi] - code[hi - 1]) / 2)


@pytest.mark.parametrize("signed", [True, False])
def test_8bit_round_trip_error_stays_within_half_a_code_gap_times_the_block_scale(signed):
    """Three blocks and a partial one: magnitudes over 9 decades, one all-zero block.
    |x - deq(q(x))| <= s * (half the gap of the codes around x/s) + s * 2^-22 (the division's rounding);
    for |x| >= 0.1 s (the top decade) that is <= 0.71% of s on the signed code."""
    rng = np.random.default_rng(2)
    n = 3 * quant.BLOCK + 777
    x = rng.standard_normal(n) * 10.0 ** rng.uniform(-9, 0, n)
    x[quant.BLOCK:2 * quant.BLOCK] = 0.0
    x = (x if signed else np.abs(x)).astype(np.float32)                      # (n,)
    code, mid = (quant.M_CODE, quant.M_MID) if signed else (quant.V_CODE, quant.V_MID)
    q, s = quant.quantize(x, code, mid)
    back = quant.dequantize(q, s, code)                                        # (n,)
    assert q.dtype == np.uint8 and s.dtype == np.float32 and s.shape == (4,) and s[1] == 0.0
    scale = np.repeat(s, quant.BLOCK)[:n].astype(np.float64)
    safe = np.where(scale > 0, scale, 1.0)
    err = np.abs(back.astype(np.float64) - x)
    assert np.all(err <= scale * (bracket_half_gap(x / safe, code) + 2.0 ** -22))
    assert np.all(back[quant.BLOCK:2 * quant.BLOCK] == 0.0)
    top = (np.abs(x) >= 0.1 * scale) & (scale > 0)
    if signed:
        assert top.any() and np.max(err[top] / scale[top]) <= 0.0071


# ---- the kernels on every backend -----------------------------------------------------------------
def run_lean_kernel(backend, state, steps=3, n=2 * quant.BLOCK + 904):
    """`steps` lean AdamW updates of one (n,)-sized tensor from fresh random values -> numpy copies
    of (p, m, v, m_scale, v_scale) (scales None for bf16)."""
    B = backend_or_skip(backend, "float32")
    rng = np.random.default_rng(4)
    p = B.from_numpy(rng.standard_normal((n // 8, 8)))                          # (n/8, 8)
    kind = "bf16" if state == "bf16" else "u8"
    m, v = B.optim_state_zeros(n, kind), B.optim_state_zeros(n, kind)
    sm, sv = B.optim_state_zeros(quant.n_blocks(n), "scale"), B.optim_state_zeros(quant.n_blocks(n), "scale")
    for t in range(1, steps + 1):
        g = B.from_numpy(rng.standard_normal((n // 8, 8)) * 10.0 ** rng.uniform(-4, 0, (n // 8, 8)))
        if state == "bf16":
            B.adamw_step_bf16(p, g, m, v, 1e-2, 0.9, 0.999, 1e-8, 0.1, t, 5)
        else:
            B.adamw_step_8bit(p, g, m, sm, v, sv, 1e-2, 0.9, 0.999, 1e-8, 0.1, t)
    scales = (None, None) if state == "bf16" else (B.optim_state_to_numpy(sm), B.optim_state_to_numpy(sv))
    return (B.to_numpy(p), B.optim_state_to_numpy(m), B.optim_state_to_numpy(v)) + scales


@pytest.mark.parametrize("state", ["bf16", "8bit"])
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_lean_adamw_kernels_match_the_numpy_reference(backend, state):
    """numba: bit for bit (the same float32 operations in the same order). torch: the moments bit for
    bit; the weights within 2 float32 ulp of themselves plus 1e-8 (a few ulp of the updates, size
    lr = 1e-2): torch divides by a scalar through its reciprocal."""
    ref, got = run_lean_kernel("numpy", state), run_lean_kernel(backend, state)
    assert got[1].dtype == ref[1].dtype == (np.uint16 if state == "bf16" else np.uint8)
    for r, g in zip(ref[1:], got[1:]):
        if r is not None:
            np.testing.assert_array_equal(g, r)
    if backend == "numba":
        np.testing.assert_array_equal(got[0], ref[0])
    else:
        np.testing.assert_allclose(got[0], ref[0], rtol=2.4e-7, atol=1e-8)


def test_lean_moments_are_the_fp32_moments_rounded():
    """One step from zero moments: m = 0.1 g, v = 0.001 g^2 exactly in float32; bf16 keeps each
    within one bfloat16 ulp (2^-7 relative), 8-bit within the stated code bound."""
    rng = np.random.default_rng(6)
    n = quant.BLOCK + 100
    g = rng.standard_normal(n).astype(np.float32)
    B = backend_or_skip("numpy", "float32")
    m32, v32 = (np.float32(0.1) * g), (np.float32(0.001) * g) * g
    p = rng.standard_normal(n).astype(np.float32)
    m, v = B.optim_state_zeros(n, "bf16"), B.optim_state_zeros(n, "bf16")
    B.adamw_step_bf16(p.copy(), g, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, 0)
    assert np.all(np.abs(quant.bf16_to_f32(m) - m32) <= np.abs(m32) * 2.0 ** -7)
    assert np.all(np.abs(quant.bf16_to_f32(v) - v32) <= v32 * 2.0 ** -7)
    qm, sm = B.optim_state_zeros(n, "u8"), B.optim_state_zeros(2, "scale")
    qv, sv = B.optim_state_zeros(n, "u8"), B.optim_state_zeros(2, "scale")
    B.adamw_step_8bit(p.copy(), g, qm, sm, qv, sv, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    scale = np.repeat(sm, quant.BLOCK)[:n]
    err = np.abs(quant.dequantize(qm, sm, quant.M_CODE) - m32)
    assert np.all(err <= scale * (bracket_half_gap(m32 / scale, quant.M_CODE) + 2.0 ** -22))
    root_err = np.abs(quant.dequantize(qv, sv, quant.V_CODE) - np.sqrt(v32))
    vscale = np.repeat(sv, quant.BLOCK)[:n]
    assert np.all(root_err <= vscale * (bracket_half_gap(np.sqrt(v32) / vscale, quant.V_CODE) + 2.0 ** -22))
