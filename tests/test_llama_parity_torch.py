"""The torch backend's Llama-family kernels (minisft/llama.py) against the numpy reference.

Fresh random inputs on packed sequences of unequal length (positions restarting at each sequence),
run through numpy and through torch: in float32 and float64 every output agrees norm-relatively
within test_backend_parity.py's tolerances (1e-5, 1e-10) and comes back in that dtype. Under
bfloat16 (float32 store, bfloat16 activations) the inputs are rounded to bfloat16 first and the
outputs must agree within 1e-2 of float32 numpy on those same inputs (bfloat16 keeps ~3 digits, as
tests/test_torch_backend.py's bfloat16 attention test), with activations in bfloat16 and statistics
and weight gradients in float32. Grouped-query attention runs on every attention path the CPU has,
including torch's CPU flash kernel fed expanded key/value heads (its fallback for a torch whose
kernel takes no grouped heads).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'minisft[torch]')")

from minisft.backends import torch_backend as tb  # noqa: E402
from minisft.backends.numpy_backend import NumpyBackend  # noqa: E402
from minisft.llama import RopeScaling, rope_tables  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

TOL = {"float32": 1e-5, "float64": 1e-10, "bfloat16": 1e-2}
LENGTHS = [37, 1, 64, 20, 45, 33]   # 200 positions, 6 sequences of unequal length
CU = np.concatenate([[0], np.cumsum(LENGTHS)])
N, L = int(CU[-1]), max(LENGTHS)
POSITIONS = np.concatenate([np.arange(n) for n in LENGTHS])  # RoPE's positions restart per sequence
H, HKV, HD = 6, 2, 12                # three query heads per key/value head
W = (H + 2 * HKV) * HD               # 120
D, F = 72, 40                        # model width, the MLP's hidden width
EPS = 1e-6


@pytest.fixture(params=["float32", "float64", "bfloat16"])
def dtype(request):
    return request.param


@pytest.fixture
def pair(dtype):
    """(numpy reference in the store dtype, torch backend under test on the CPU)."""
    return NumpyBackend("float64" if dtype == "float64" else "float32"), tb.TorchBackend(dtype, "cpu")


@pytest.fixture
def rng():
    return np.random.default_rng(20261204)


def host(R, T, a):
    """a in the reference's dtype, as both backends see it: under bfloat16 rounded to bfloat16 first
    (what a bfloat16 matmul hands over)."""
    if T.dtype == "bfloat16":
        return torch.from_numpy(np.asarray(a, dtype=np.float32)).to(torch.bfloat16).float().numpy()
    return np.asarray(a, dtype=R.np_dtype)


def act(T, a):
    """An activation the previous kernel would hand over: in the compute dtype (bfloat16 under bfloat16)."""
    return T.from_numpy(a).to(T.compute)


def check(T, got, ref, what, compute=False):
    """got: torch's output, ref: numpy's. compute: got is an activation, so in the compute dtype;
    otherwise (statistics, weight gradients, the residual stream) in the store dtype."""
    want = T.compute if compute else T.store
    assert got.dtype == want, f"{what}: {got.dtype}, not {want}"
    assert tuple(got.shape) == ref.shape, f"{what}: shape {tuple(got.shape)} != {ref.shape}"
    err = rel_err(T.to_numpy(got), ref)
    print(f"{T.dtype:8s} {what:40s} {err:.2e}")
    assert err <= TOL[T.dtype], f"{what}: relative error {err:.2e} > {TOL[T.dtype]}"


def test_token_embedding_matches_numpy(pair, rng):
    R, T = pair
    V = 50
    tokens = rng.integers(0, V, N)   # 200 draws from 50 ids: repeats the scatter must add
    wte, dx, dwte0 = rng.normal(size=(V, D)), rng.normal(size=(N, D)), rng.normal(size=(V, D))
    check(T, T.token_embedding_forward(T.index(tokens), T.from_numpy(wte)),
          R.token_embedding_forward(tokens, R.from_numpy(wte)), "token_embedding_forward")
    dwte, ref = T.from_numpy(dwte0), R.from_numpy(dwte0)                  # both ADD into these
    T.token_embedding_backward(dwte, act(T, host(R, T, dx)), T.index(tokens))
    R.token_embedding_backward(ref, host(R, T, dx), tokens)
    check(T, dwte, ref, "token_embedding_backward")


def test_rmsnorm_matches_numpy_with_and_without_the_skip_gradient(pair, rng):
    R, T = pair
    x, w = rng.normal(size=(N, D)) * 2.5 + 0.7, rng.normal(size=D)
    dout, dskip = host(R, T, rng.normal(size=(N, D))), rng.normal(size=(N, D))
    out, rstd = T.rmsnorm_forward(T.from_numpy(x), T.from_numpy(w), EPS)   # x: the float32 residual stream
    ref_out, ref_rstd = R.rmsnorm_forward(R.from_numpy(x), R.from_numpy(w), EPS)
    check(T, out, ref_out, "rmsnorm_forward out", compute=True)
    check(T, rstd, ref_rstd, "rmsnorm_forward rstd")
    for skip in (None, dskip):
        dx, dw = T.rmsnorm_backward(act(T, dout), T.from_numpy(x), T.from_numpy(w), rstd,
                                    dskip=None if skip is None else T.from_numpy(skip))
        ref_dx, ref_dw = R.rmsnorm_backward(dout, R.from_numpy(x), R.from_numpy(w), ref_rstd,
                                            dskip=None if skip is None else R.from_numpy(skip))
        what = "rmsnorm_backward" + ("" if skip is None else " with dskip")
        check(T, dx, ref_dx, what + " dx")
        check(T, dw, ref_dw, what + " dw")


def test_qk_norm_matches_numpy_and_passes_the_value_heads(pair, rng):
    R, T = pair
    qkv, dout = host(R, T, rng.normal(size=(N, W)) * 1.5), host(R, T, rng.normal(size=(N, W)))
    wq, wk = rng.normal(size=HD), rng.normal(size=HD)
    out, rstd = T.qk_norm_forward(act(T, qkv), T.from_numpy(wq), T.from_numpy(wk), EPS, H, HKV)
    ref_out, ref_rstd = R.qk_norm_forward(qkv, R.from_numpy(wq), R.from_numpy(wk), EPS, H, HKV)
    check(T, out, ref_out, "qk_norm_forward out", compute=True)
    check(T, rstd, ref_rstd, "qk_norm_forward rstd")
    np.testing.assert_array_equal(T.to_numpy(out)[:, (H + HKV) * HD:], qkv[:, (H + HKV) * HD:])
    dqkv, dwq, dwk = T.qk_norm_backward(act(T, dout), act(T, qkv), T.from_numpy(wq), T.from_numpy(wk), rstd, H, HKV)
    ref = R.qk_norm_backward(dout, qkv, R.from_numpy(wq), R.from_numpy(wk), ref_rstd, H, HKV)
    check(T, dqkv, ref[0], "qk_norm_backward dqkv", compute=True)
    check(T, dwq, ref[1], "qk_norm_backward dwq")
    check(T, dwk, ref[2], "qk_norm_backward dwk")


@pytest.mark.parametrize("scaling", [None, RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                       original_context=16)], ids=["plain", "llama3"])
def test_rope_matches_numpy_and_leaves_the_value_heads(pair, rng, scaling):
    R, T = pair
    cos, sin = rope_tables(HD, 128, 10000.0, scaling)                       # (C, hd/2) each, float64
    qkv, dout = host(R, T, rng.normal(size=(N, W))), host(R, T, rng.normal(size=(N, W)))
    tables = [(X.from_numpy(cos), X.from_numpy(sin), X.index(POSITIONS)) for X in (R, T)]
    out = T.rope_forward(act(T, qkv), *tables[1], H + HKV)
    check(T, out, R.rope_forward(qkv, *tables[0], H + HKV), "rope_forward", compute=True)
    np.testing.assert_array_equal(T.to_numpy(out)[:, (H + HKV) * HD:], qkv[:, (H + HKV) * HD:])
    check(T, T.rope_backward(act(T, dout), *tables[1], H + HKV), R.rope_backward(dout, *tables[0], H + HKV),
          "rope_backward", compute=True)


def test_swiglu_matches_numpy(pair, rng):
    R, T = pair
    gu, dy = host(R, T, rng.normal(size=(N, 2 * F)) * 3), host(R, T, rng.normal(size=(N, F)))  # * 3: sigmoid's tails
    check(T, T.swiglu_forward(act(T, gu)), R.swiglu_forward(gu), "swiglu_forward", compute=True)
    check(T, T.swiglu_backward(act(T, dy), act(T, gu)), R.swiglu_backward(dy, gu), "swiglu_backward", compute=True)


def cpu_paths(dtype):
    """Every attention path the CPU has for this dtype, plus torch's CPU flash kernel fed expanded
    key/value heads ("cpu-flash-expanded"), the route a torch without grouped-head support takes."""
    why = tb.attention_options("cpu", tb.DTYPES[dtype][1], HD)
    paths = [p for p in tb.ATTENTION_PATHS if why[p] is None]
    return paths + (["cpu-flash-expanded"] if "cpu-flash-padded" in paths else [])


@pytest.mark.parametrize("heads", [(H, HKV), (H, 1), (H, H)], ids=["gqa", "mqa", "mha"])
# "long": past CPU_FLASH_F32_MAX_LEN, where torch's CPU flash kernel computes bfloat16 in bfloat16
@pytest.mark.parametrize("lengths", [LENGTHS, [64] * 3, [tb.CPU_FLASH_F32_MAX_LEN + 9, 7]],
                         ids=["unequal", "equal", "long"])
def test_grouped_query_attention_matches_numpy_on_every_cpu_path(pair, rng, monkeypatch, heads, lengths):
    R, T = pair
    n_heads, n_kv = heads
    cu = np.concatenate([[0], np.cumsum(lengths)])
    n, max_len = int(cu[-1]), max(lengths)
    qkv = host(R, T, rng.normal(size=(n, (n_heads + 2 * n_kv) * HD)))
    dout = host(R, T, rng.normal(size=(n, n_heads * HD)))
    out_ref, ctx_ref = R.attention_forward(qkv, cu, n_heads, max_len, n_kv_heads=n_kv)
    dqkv_ref = R.attention_backward(dout, qkv, out_ref, ctx_ref, cu, n_heads, max_len, n_kv_heads=n_kv)
    for path in cpu_paths(T.dtype):
        with monkeypatch.context() as m:
            if path == "cpu-flash-expanded":
                m.setattr(tb, "cpu_flash_gqa_problem", lambda: "the test asks for expanded heads")
            T = tb.TorchBackend(T.dtype, "cpu", attention=path.replace("expanded", "padded"))
            cu_t, qkv_t = T.index(cu), act(T, qkv)
            out, ctx = T.attention_forward(qkv_t, cu_t, n_heads, max_len, n_kv_heads=n_kv)
            dqkv = T.attention_backward(act(T, dout), qkv_t, out, ctx, cu_t, n_heads, max_len, n_kv_heads=n_kv)
        check(T, out, out_ref, f"attention {path} out", compute=True)
        check(T, dqkv, dqkv_ref, f"attention {path} dqkv", compute=True)


def test_grouped_kv_cache_write_and_decode_match_numpy(pair, rng):
    """A prefill of the packed prompts writes the cache; one decode step per sequence then writes its
    new token at lens - 1 and attends over cache positions [0, lens)."""
    R, T = pair
    S, max_len = len(LENGTHS), L + 3
    prompt, step = host(R, T, rng.normal(size=(N, W))), host(R, T, rng.normal(size=(S, W)))
    seq_ids, lens = np.repeat(np.arange(S), LENGTHS), np.array(LENGTHS) + 1
    caches = []
    for X, conv in ((R, lambda a: a), (T, lambda a: act(T, a))):
        k, v = X.kv_cache_alloc(S, HKV, max_len, HD)                         # (S, Hkv, T, hd) each
        X.kv_cache_write(k, v, conv(prompt), X.index(seq_ids), X.index(POSITIONS))
        X.kv_cache_write(k, v, conv(step), X.index(np.arange(S)), X.index(lens - 1))
        caches.append((k, v, X.attention_decode(conv(step), k, v, X.index(lens), H, int(lens.max()))))
    (k_ref, v_ref, out_ref), (k, v, out) = caches
    assert k.dtype == v.dtype == T.kv_dtype
    check(T, k, k_ref, "kv_cache_write k", compute=True)
    check(T, v, v_ref, "kv_cache_write v", compute=True)
    check(T, out, out_ref, "attention_decode")
