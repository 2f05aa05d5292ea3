"""The Llama family's kernels (minisft/llama.py): each backward agrees with central finite differences
of its forward, on every backend, in float64 on fresh random inputs (as tests/test_kernels_fd.py does
for GPT-2's): f = sum(G * forward(inputs)) for a random upstream gradient G, so the analytic
gradient is backward(G); the norm-relative error over sampled entries must be at most 1e-7.
"""
import numpy as np
import pytest

from minisft.llama import rope_tables, RopeScaling
from tests.helpers import ALL_BACKENDS, backend_or_skip, contract, fd_check


@pytest.fixture(params=ALL_BACKENDS)
def B(request):
    return backend_or_skip(request.param, "float64")


@pytest.fixture
def rng():
    return np.random.default_rng(4321)



def test_token_embedding_backward_scatter_adds_repeated_tokens_like_finite_differences(B, rng):
    V, d = 7, 5
    tokens = np.concatenate([rng.integers(0, V, 12), [3, 3, 3]])  # a token repeated on purpose
    wte, G = rng.normal(size=(V, d)), rng.normal(size=(len(tokens), d))
    dwte = B.from_numpy(np.zeros((V, d)))
    B.token_embedding_backward(dwte, B.from_numpy(G), B.index(tokens))
    fd_check(lambda wte: contract(B, B.token_embedding_forward(B.index(tokens), B.from_numpy(wte)), G),
             dict(wte=wte), dict(wte=B.to_numpy(dwte)), rng)


def test_rmsnorm_backward_matches_finite_differences_and_adds_the_skip_gradient(B, rng):
    N, d, eps = 7, 10, 1e-5
    x, w = rng.normal(size=(N, d)) * 2 + 0.5, rng.normal(size=d)
    G, skip = rng.normal(size=(N, d)), rng.normal(size=(N, d))
    _, rstd = B.rmsnorm_forward(B.from_numpy(x), B.from_numpy(w), eps)
    dx, dw = B.rmsnorm_backward(B.from_numpy(G), B.from_numpy(x), B.from_numpy(w), rstd)
    fd_check(lambda x, w: contract(B, B.rmsnorm_forward(B.from_numpy(x), B.from_numpy(w), eps)[0], G),
             dict(x=x, w=w), dict(x=B.to_numpy(dx), w=B.to_numpy(dw)), rng)
    dx2, _ = B.rmsnorm_backward(B.from_numpy(G), B.from_numpy(x), B.from_numpy(w), rstd, dskip=B.from_numpy(skip))
    np.testing.assert_allclose(B.to_numpy(dx2), B.to_numpy(dx) + skip, rtol=1e-12, atol=1e-12)


def test_qk_norm_backward_matches_finite_differences_and_passes_the_value_heads(B, rng):
    N, H, Hkv, hd, eps = 5, 4, 2, 6, 1e-6
    qkv = rng.normal(size=(N, (H + 2 * Hkv) * hd)) * 1.5
    wq, wk, G = rng.normal(size=hd), rng.normal(size=hd), rng.normal(size=qkv.shape)
    out, rstd = B.qk_norm_forward(B.from_numpy(qkv), B.from_numpy(wq), B.from_numpy(wk), eps, H, Hkv)
    np.testing.assert_array_equal(B.to_numpy(out)[:, (H + Hkv) * hd:], qkv[:, (H + Hkv) * hd:])
    dqkv, dwq, dwk = B.qk_norm_backward(B.from_numpy(G), B.from_numpy(qkv), B.from_numpy(wq), B.from_numpy(wk),
                                        rstd, H, Hkv)

    def f(qkv, wq, wk):
        return contract(B, B.qk_norm_forward(B.from_numpy(qkv), B.from_numpy(wq), B.from_numpy(wk), eps, H, Hkv)[0], G)
    fd_check(f, dict(qkv=qkv, wq=wq, wk=wk), dict(qkv=B.to_numpy(dqkv), wq=B.to_numpy(dwq), wk=B.to_numpy(dwk)), rng)


@pytest.mark.parametrize("scaling", [None, RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                       original_context=16)])
def test_rope_backward_matches_finite_differences_and_leaves_the_value_heads(B, rng, scaling):
    N, H, Hkv, hd, C = 9, 4, 2, 8, 32
    cos, sin = rope_tables(hd, C, 500.0, scaling)                                   # (C, hd/2) each
    positions = np.concatenate([np.arange(5), np.arange(4) + 20])                    # two packed sequences
    qkv, G = rng.normal(size=(N, (H + 2 * Hkv) * hd)), rng.normal(size=(N, (H + 2 * Hkv) * hd))
    c, s, pos = B.from_numpy(cos), B.from_numpy(sin), B.index(positions)
    out = B.to_numpy(B.rope_forward(B.from_numpy(qkv), c, s, pos, H + Hkv))
    np.testing.assert_array_equal(out[:, (H + Hkv) * hd:], qkv[:, (H + Hkv) * hd:])
    # a rotation keeps every head vector's length
    np.testing.assert_allclose(np.linalg.norm(out.reshape(N, -1, hd), axis=-1),
                               np.linalg.norm(qkv.reshape(N, -1, hd), axis=-1), rtol=1e-12)
    dqkv = B.rope_backward(B.from_numpy(G), c, s, pos, H + Hkv)
    fd_check(lambda qkv: contract(B, B.rope_forward(B.from_numpy(qkv), c, s, pos, H + Hkv), G),
             dict(qkv=qkv), dict(qkv=B.to_numpy(dqkv)), rng)


def test_swiglu_backward_matches_finite_differences(B, rng):
    N, f = 6, 7
    gu, G = rng.normal(size=(N, 2 * f)) * 2, rng.normal(size=(N, f))
    dgu = B.swiglu_backward(B.from_numpy(G), B.from_numpy(gu))
    fd_check(lambda gu: contract(B, B.swiglu_forward(B.from_numpy(gu)), G), dict(gu=gu), dict(gu=B.to_numpy(dgu)), rng)


@pytest.mark.parametrize("heads", [(4, 2), (6, 1), (4, 4)], ids=["gqa", "mqa", "mha"])
def test_grouped_query_attention_backward_matches_finite_differences_on_unequal_sequences(B, rng, heads):
    H, Hkv = heads
    hd, cu = 4, np.array([0, 5, 6, 13])                     # sequences of 5, 1 and 7 positions
    N, L = cu[-1], 7
    qkv = rng.normal(size=(N, (H + 2 * Hkv) * hd))
    G = rng.normal(size=(N, H * hd))
    cu_b = B.index(cu)
    out, ctx = B.attention_forward(B.from_numpy(qkv), cu_b, H, L, n_kv_heads=Hkv)
    assert tuple(out.shape) == (N, H * hd)
    dqkv = B.attention_backward(B.from_numpy(G), B.from_numpy(qkv), out, ctx, cu_b, H, L, n_kv_heads=Hkv)
    fd_check(lambda qkv: contract(B, B.attention_forward(B.from_numpy(qkv), cu_b, H, L, n_kv_heads=Hkv)[0], G),
             dict(qkv=qkv), dict(qkv=B.to_numpy(dqkv)), rng)


def test_grouped_query_attention_equals_full_attention_with_each_kv_head_repeated(B, rng):
    """GQA is multi-head attention whose key/value heads are copies: query head h reads kv head h // G."""
    H, Hkv, hd, cu = 6, 2, 4, np.array([0, 4, 11])
    N, G = cu[-1], H // Hkv
    qkv = rng.normal(size=(N, (H + 2 * Hkv) * hd))
    q, k, v = np.split(qkv, [H * hd, (H + Hkv) * hd], axis=1)
    rep = lambda t: np.repeat(t.reshape(N, Hkv, hd), G, axis=1).reshape(N, H * hd)  # noqa: E731
    full = np.concatenate([q, rep(k), rep(v)], axis=1)                              # (N, 3 H hd)
    got = B.to_numpy(B.attention_forward(B.from_numpy(qkv), B.index(cu), H, 7, n_kv_heads=Hkv)[0])
    want = B.to_numpy(B.attention_forward(B.from_numpy(full), B.index(cu), H, 7)[0])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_grouped_decode_attends_over_its_cache_like_the_last_row_of_packed_attention(B, rng):
    H, Hkv, hd, L = 4, 2, 4, 6
    W = (H + 2 * Hkv) * hd
    qkv = rng.normal(size=(L, W))                                    # one sequence of L positions
    k_cache, v_cache = B.kv_cache_alloc(1, Hkv, L + 2, hd)
    B.kv_cache_write(k_cache, v_cache, B.from_numpy(qkv), B.index(np.zeros(L, np.int64)), B.index(np.arange(L)))
    got = B.to_numpy(B.attention_decode(B.from_numpy(qkv[-1:]), k_cache, v_cache, B.index([L]), H, L))
    want = B.to_numpy(B.attention_forward(B.from_numpy(qkv), B.index([0, L]), H, L, n_kv_heads=Hkv)[0])[-1:]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
