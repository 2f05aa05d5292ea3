"""Every differentiable kernel's backward agrees with central finite differences of its forward.

Each check runs in float64 on fresh random inputs: f = sum(G * forward(inputs)) for a random
upstream gradient G, so the analytic gradient is backward(G). Sampled entries of every input are
perturbed by +-eps; the norm-relative error over the samples must be at most 1e-7.
"""
import numpy as np
import pytest

from minisft.batch import IGNORE_INDEX
from tests.helpers import ALL_BACKENDS, backend_or_skip
from tests.helpers import contract, fd_check

@pytest.fixture(params=ALL_BACKENDS)
def B(request):
    return backend_or_skip(request.param, "float64")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)



def test_embedding_backward_scatter_adds_repeated_tokens_like_finite_differences(B, rng):
    V, C, d, N = 11, 9, 6, 20
    tokens = rng.integers(0, V, N)          # repeats on purpose: the backward must scatter-ADD
    positions = rng.integers(0, C, N)
    wte, wpe = rng.normal(size=(V, d)), rng.normal(size=(C, d))
    G = rng.normal(size=(N, d))
    dwte, dwpe = B.from_numpy(np.zeros((V, d))), B.from_numpy(np.zeros((C, d)))
    B.embedding_backward(dwte, dwpe, B.from_numpy(G), B.index(tokens), B.index(positions))

    def f(wte, wpe):
        return contract(B, B.embedding_forward(B.index(tokens), B.index(positions),
                                               B.from_numpy(wte), B.from_numpy(wpe)), G)
    fd_check(f, dict(wte=wte, wpe=wpe), dict(wte=B.to_numpy(dwte), wpe=B.to_numpy(dwpe)), rng)


def test_layernorm_backward_matches_finite_differences_for_x_gain_and_bias(B, rng):
    N, d = 7, 10
    x = rng.normal(size=(N, d)) * 3 + 1
    w, b = rng.normal(size=d), rng.normal(size=d)
    G = rng.normal(size=(N, d))
    out, mean, rstd = B.layernorm_forward(B.from_numpy(x), B.from_numpy(w), B.from_numpy(b))
    dx, dw, db = B.layernorm_backward(B.from_numpy(G), B.from_numpy(x), B.from_numpy(w), mean, rstd)

    def f(x, w, b):
        return contract(B, B.layernorm_forward(B.from_numpy(x), B.from_numpy(w), B.from_numpy(b))[0], G)
    fd_check(f, dict(x=x, w=w, b=b), dict(x=B.to_numpy(dx), w=B.to_numpy(dw), b=B.to_numpy(db)), rng)


def test_linear_backward_matches_finite_differences_for_x_weight_and_bias(B, rng):
    N, n_in, n_out = 9, 7, 5
    x, w, b = rng.normal(size=(N, n_in)), rng.normal(size=(n_in, n_out)), rng.normal(size=n_out)
    G = rng.normal(size=(N, n_out))
    dx, dw, db = B.linear_backward(B.from_numpy(G), B.from_numpy(x), B.from_numpy(w))

    def f(x, w, b):
        return contract(B, B.linear_forward(B.from_numpy(x), B.from_numpy(w), B.from_numpy(b)), G)
    fd_check(f, dict(x=x, w=w, b=b), dict(x=B.to_numpy(dx), w=B.to_numpy(dw), b=B.to_numpy(db)), rng)
    # A frozen weight: no dW at all, the other gradients unchanged.
    dx2, dw2, db2 = B.linear_backward(B.from_numpy(G), B.from_numpy(x), B.from_numpy(w), need_dw=False)
    assert dw2 is None
    np.testing.assert_array_equal(B.to_numpy(dx2), B.to_numpy(dx))
    np.testing.assert_array_equal(B.to_numpy(db2), B.to_numpy(db))


@pytest.mark.parametrize("lengths", [[5, 1, 8, 3], [6, 6]])
def test_attention_backward_matches_finite_differences_on_unequal_sequences(B, rng, lengths):
    H, hd = 3, 4
    d = H * hd
    cu = np.concatenate([[0], np.cumsum(lengths)])
    N = int(cu[-1])
    qkv = rng.normal(size=(N, 3 * d))
    G = rng.normal(size=(N, d))
    cu_b, L = B.index(cu), max(lengths)
    out, ctx = B.attention_forward(B.from_numpy(qkv), cu_b, H, L)
    dqkv = B.attention_backward(B.from_numpy(G), B.from_numpy(qkv), out, ctx, cu_b, H, L)

    def f(qkv):
        return contract(B, B.attention_forward(B.from_numpy(qkv), cu_b, H, L)[0], G)
    fd_check(f, dict(qkv=qkv), dict(qkv=B.to_numpy(dqkv)), rng)


def test_attention_is_causal_and_stays_inside_its_sequence(B, rng):
    H, hd = 2, 3  # two sequences, of lengths 4 and 5
    d = H * hd
    cu = np.array([0, 4, 9])
    qkv = rng.normal(size=(9, 3 * d))
    out = B.to_numpy(B.attention_forward(B.from_numpy(qkv), B.index(cu), H, 5)[0])
    changed = qkv.copy()
    changed[6] += 10.0            # position 2 of the second sequence
    out2 = B.to_numpy(B.attention_forward(B.from_numpy(changed), B.index(cu), H, 5)[0])
    np.testing.assert_array_equal(out2[:6], out[:6])   # the first sequence and earlier positions
    assert np.abs(out2[6:] - out[6:]).min() > 0        # later positions of its own sequence see it


def test_gelu_backward_matches_finite_differences(B, rng):
    x = rng.normal(size=(6, 9)) * 2
    G = rng.normal(size=x.shape)
    dx = B.gelu_backward(B.from_numpy(G), B.from_numpy(x))
    fd_check(lambda x: contract(B, B.gelu_forward(B.from_numpy(x)), G), dict(x=x), dict(x=B.to_numpy(dx)), rng)


def test_residual_backward_sends_the_gradient_to_both_inputs(B, rng):
    a, b, G = rng.normal(size=(4, 5)), rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    da, db = B.residual_backward(B.from_numpy(G))

    def f(a, b):
        return contract(B, B.residual_forward(B.from_numpy(a), B.from_numpy(b)), G)
    fd_check(f, dict(a=a, b=b), dict(a=B.to_numpy(da), b=B.to_numpy(db)), rng)


def test_dropout_backward_matches_finite_differences_through_its_mask(B, rng):
    x, G, p = rng.normal(size=(40, 8)), rng.normal(size=(40, 8)), 0.3
    y, mask = B.dropout_forward(B.from_numpy(x), p, B.rng(7))
    dx = B.dropout_backward(B.from_numpy(G), mask)

    def f(x):  # the same seed: the same mask on every evaluation
        return contract(B, B.dropout_forward(B.from_numpy(x), p, B.rng(7))[0], G)
    fd_check(f, dict(x=x), dict(x=B.to_numpy(dx)), rng)
    m = B.to_numpy(mask)
    assert set(np.unique(m)) == {0.0, 1.0 / (1.0 - p)}
    assert 0.15 < np.mean(m == 0) < 0.45  # about p of the 320 entries dropped


@pytest.mark.parametrize("n_rows", [13, 600])  # 600 > one row chunk: chunk boundaries are crossed
def test_fused_head_loss_gradients_match_finite_differences_with_ignored_targets(B, rng, n_rows):
    V, d, scale = 23, 6, 0.37
    h, w = rng.normal(size=(n_rows, d)), rng.normal(size=(V, d))
    targets = rng.integers(0, V, n_rows)
    targets[rng.random(n_rows) < 0.3] = IGNORE_INDEX
    dw0 = rng.normal(size=(V, d))            # the kernel ADDS into dw
    dw = B.from_numpy(dw0)
    loss_sum, n_valid, dh = B.head_loss(B.from_numpy(h), B.from_numpy(w), B.index(targets), dw=dw,
                                        grad_scale=scale)
    assert n_valid == np.count_nonzero(targets != IGNORE_INDEX)
    # The loss itself, against a direct computation over the full logits matrix.
    logits = h @ w.T
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    valid = targets != IGNORE_INDEX
    expect = np.sum(lse[valid] - logits[valid, targets[valid]])
    assert abs(B.item(loss_sum) - expect) <= 1e-12 * abs(expect)

    def f(h, w):
        return scale * B.item(B.head_loss(B.from_numpy(h), B.from_numpy(w), B.index(targets))[0])
    dh_np = B.to_numpy(dh)
    assert np.all(dh_np[~valid] == 0)        # ignored rows get no gradient
    fd_check(f, dict(h=h, w=w), dict(h=dh_np, w=B.to_numpy(dw) - dw0), rng)


def test_fused_head_loss_without_gradient_returns_the_same_loss(B, rng):
    h, w = rng.normal(size=(5, 4)), rng.normal(size=(7, 4))
    targets = np.array([1, IGNORE_INDEX, 3, 6, IGNORE_INDEX])
    loss_sum, n_valid, dh = B.head_loss(B.from_numpy(h), B.from_numpy(w), B.index(targets))
    assert dh is None and n_valid == 3
    np.testing.assert_allclose(B.to_numpy(B.head_logits(B.from_numpy(h), B.from_numpy(w))), h @ w.T, rtol=1e-13)


def test_global_norm_and_scale_agree_with_their_definitions(B, rng):
    gs = [rng.normal(size=(3, 4)), rng.normal(size=7)]
    arrs = [B.from_numpy(g) for g in gs]
    expect = np.sqrt(sum((g ** 2).sum() for g in gs))
    assert abs(B.global_norm(arrs) - expect) <= 1e-13 * expect
    B.scale_(arrs, 0.5)
    for a, g in zip(arrs, gs):
        np.testing.assert_allclose(B.to_numpy(a), 0.5 * g, rtol=1e-15)
