"""The numba backend's Llama-family kernels against the numpy reference, as tests/test_backend_parity.py
does for GPT-2's: fresh random inputs through both backends, every output norm-relatively within 1e-5
in float32 and 1e-10 in float64, in the backend's store dtype. dtype bfloat16 runs these kernels in
float32 (only matmuls take bf16 operands), so it is held to float32's reference and tolerance. Sizes
straddle the kernels' chunking: 200 rows (not a multiple of ROW_CHUNK), six packed sequences of unequal
length (one of a single position), repeated tokens, every grouping of key/value heads.
"""
import numpy as np
import pytest

from minisft.backends import bf16
from minisft.llama import RopeScaling, rope_tables
from tests.helpers import backend_or_skip, check_parity, same_on_one_thread

STORE = {"float32": "float32", "float64": "float64", "bfloat16": "float32"}
LENGTHS = [37, 1, 64, 20, 45, 33]    # 200 positions, 6 sequences of unequal length
N, H, HD = sum(LENGTHS), 6, 12
D = 72


@pytest.fixture(params=["float32", "float64", "bfloat16"])
def pair(request):
    """(reference numpy backend in the store dtype, the numba backend in dtype)."""
    if request.param == "bfloat16" and bf16.problem():
        pytest.skip(f"numba bfloat16: {bf16.problem()}")
    return backend_or_skip("numpy", STORE[request.param]), backend_or_skip("numba", request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(20261204)




def packed_positions():
    return np.concatenate([np.arange(n) for n in LENGTHS])  # (N,) each sequence from position 0


def test_token_embedding_matches_numpy_with_repeated_tokens(pair, rng):
    R, B = pair
    V = 50
    tokens, wte = rng.integers(0, V, N), rng.normal(size=(V, D))  # 200 draws of 50 ids: many repeats
    check_parity(R, B, *(X.token_embedding_forward(X.index(tokens), X.from_numpy(wte)) for X in (R, B)),
          "token_embedding_forward")
    dx, dwte0 = rng.normal(size=(N, D)), rng.normal(size=(V, D))  # the kernel adds into dwte0
    bufs = []
    for X in (R, B):
        dwte = X.from_numpy(dwte0)
        X.token_embedding_backward(dwte, X.from_numpy(dx), X.index(tokens))
        bufs.append(dwte)
    check_parity(R, B, *bufs, "token_embedding_backward")


def test_rmsnorm_forward_and_backward_match_numpy(pair, rng):
    R, B = pair
    x, w = rng.normal(size=(N, D)) * 2.5 + 0.7, rng.normal(size=D)
    fwd = [X.rmsnorm_forward(X.from_numpy(x), X.from_numpy(w), 1e-5) for X in (R, B)]
    check_parity(R, B, *fwd, "rmsnorm_forward")
    dout, dskip = rng.normal(size=x.shape), rng.normal(size=x.shape)
    for skip in (None, dskip):  # each backend's backward gets its own forward's rstd
        bwd = [X.rmsnorm_backward(X.from_numpy(dout), X.from_numpy(x), X.from_numpy(w), f[1],
                                  dskip=None if skip is None else X.from_numpy(skip)) for X, f in zip((R, B), fwd)]
        check_parity(R, B, *bwd, f"rmsnorm_backward (dskip {skip is not None})")


@pytest.mark.parametrize("Hkv", [2, 6])
def test_qk_norm_forward_and_backward_match_numpy(pair, rng, Hkv):
    R, B = pair
    qkv = rng.normal(size=(N, (H + 2 * Hkv) * HD)) * 1.5
    wq, wk, dout = rng.normal(size=HD), rng.normal(size=HD), rng.normal(size=qkv.shape)
    fwd = [X.qk_norm_forward(X.from_numpy(qkv), X.from_numpy(wq), X.from_numpy(wk), 1e-6, H, Hkv) for X in (R, B)]
    check_parity(R, B, *fwd, "qk_norm_forward")
    bwd = [X.qk_norm_backward(X.from_numpy(dout), X.from_numpy(qkv), X.from_numpy(wq), X.from_numpy(wk), f[1], H, Hkv)
           for X, f in zip((R, B), fwd)]
    check_parity(R, B, *bwd, "qk_norm_backward")


@pytest.mark.parametrize("scaling", [None, RopeScaling(8.0, 1.0, 4.0, 16)], ids=["plain", "llama3"])
def test_rope_forward_and_backward_match_numpy(pair, rng, scaling):
    R, B = pair
    Hkv, C = 2, 64
    cos, sin = rope_tables(HD, C, 500.0, scaling)                                   # (C, hd/2) each
    qkv, dout = rng.normal(size=(N, (H + 2 * Hkv) * HD)), rng.normal(size=(N, (H + 2 * Hkv) * HD))
    pos = packed_positions()
    for kernel, x in (("rope_forward", qkv), ("rope_backward", dout)):
        outs = [getattr(X, kernel)(X.from_numpy(x), X.from_numpy(cos), X.from_numpy(sin), X.index(pos), H + Hkv)
                for X in (R, B)]
        check_parity(R, B, *outs, kernel)


def test_swiglu_forward_and_backward_match_numpy(pair, rng):
    R, B = pair
    f = 75
    gu, dy = rng.normal(size=(N, 2 * f)) * 3, rng.normal(size=(N, f))   # reaches sigmoid's tails
    check_parity(R, B, *(X.swiglu_forward(X.from_numpy(gu)) for X in (R, B)), "swiglu_forward")
    check_parity(R, B, *(X.swiglu_backward(X.from_numpy(dy), X.from_numpy(gu)) for X in (R, B)), "swiglu_backward")


@pytest.mark.parametrize("Hkv", [2, 3, 1, 6], ids=["gqa2", "gqa3", "mqa", "mha"])
def test_grouped_query_attention_matches_numpy_on_unequal_sequences(pair, rng, Hkv):
    R, B = pair
    cu = np.concatenate([[0], np.cumsum(LENGTHS)])
    qkv, dout = rng.normal(size=(N, (H + 2 * Hkv) * HD)), rng.normal(size=(N, H * HD))
    fwd = [X.attention_forward(X.from_numpy(qkv), X.index(cu), H, max(LENGTHS), n_kv_heads=Hkv) for X in (R, B)]
    check_parity(R, B, fwd[0][0], fwd[1][0], "attention_forward")
    bwd = [X.attention_backward(X.from_numpy(dout), X.from_numpy(qkv), f[0], f[1], X.index(cu), H, max(LENGTHS),
                                n_kv_heads=Hkv) for X, f in zip((R, B), fwd)]
    check_parity(R, B, *bwd, "attention_backward")


def test_grouped_kv_cache_write_and_decode_match_numpy(pair, rng):
    R, B = pair
    Hkv, T = 2, 70
    W = (H + 2 * Hkv) * HD
    qkv, q_dec = rng.normal(size=(N, W)), rng.normal(size=(len(LENGTHS), W))
    seq_ids, pos = np.repeat(np.arange(len(LENGTHS)), LENGTHS), packed_positions()
    lens = np.array(LENGTHS)                 # each sequence decodes over its whole prompt
    outs = []
    for X in (R, B):
        k, v = X.kv_cache_alloc(len(LENGTHS), Hkv, T, HD)
        X.kv_cache_write(k, v, X.from_numpy(qkv), X.index(seq_ids), X.index(pos))
        outs.append((k, v, X.attention_decode(X.from_numpy(q_dec), k, v, X.index(lens), H, int(lens.max()))))
    check_parity(R, B, *outs, "kv_cache_write, attention_decode")


def test_llama_reductions_do_not_depend_on_the_thread_count(pair, rng):
    """RMSNorm's and the q/k norm's weight gradients and the token scatter sum fixed chunks, not one
    per thread: one thread and all threads give bit-identical results."""
    pytest.importorskip("numba")
    _, B = pair
    Hkv = 2
    x, dout, w = rng.normal(size=(N, D)), rng.normal(size=(N, D)), rng.normal(size=D)
    qkv = rng.normal(size=(N, (H + 2 * Hkv) * HD))
    wq, wk, tokens = rng.normal(size=HD), rng.normal(size=HD), rng.integers(0, 20, N)

    def run():
        f = B.from_numpy
        _, rstd = B.rmsnorm_forward(f(x), f(w), 1e-5)
        rms = B.rmsnorm_backward(f(dout), f(x), f(w), rstd)
        _, qrstd = B.qk_norm_forward(f(qkv), f(wq), f(wk), 1e-6, H, Hkv)
        qk = B.qk_norm_backward(f(qkv), f(qkv), f(wq), f(wk), qrstd, H, Hkv)
        dwte = B.zeros_like(f(np.zeros((20, D))))
        B.token_embedding_backward(dwte, f(dout), B.index(tokens))
        return [*rms, *qk, dwte]

    same_on_one_thread(run)
