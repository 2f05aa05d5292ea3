"""The numba backend's bfloat16 mixed precision (backends/bf16.py, oneDNN GEMMs): rounding, the GEMM
against float64 within bf16 rounding bounds, each bf16 kernel against the numpy float32 reference,
the AdamW pass keeping the weights' bf16 copies current, and 50 steps of the book's recipe in bf16
against float32. Skipped where oneDNN or the CPU's bf16 units are missing (the reason is printed).

Bounds. bf16 keeps 8 significant bits: rounding to nearest moves x by at most u|x|, u = 2^-8. A
product of two rounded operands is off by at most (2u + u^2)|a||b|, and float32 accumulation of K
terms adds at most K * 2^-24 * sum|a||b|. So every GEMM element obeys
    |C - A @ B| <= (2u + u^2 + K 2^-24) * (|A| @ |B|)        (A, B the float32 inputs)
    |C - Ab @ Bb| <= K 2^-24 * (|Ab| @ |Bb|)                  (Ab, Bb the rounded operands)
"""
import subprocess
import sys

import numpy as np
import pytest

from minisft.backends import bf16, get_backend
from minisft.backends.numpy_backend import NumpyBackend
from minisft.batch import IGNORE_INDEX

pytestmark = pytest.mark.skipif(bf16.problem() is not None, reason=f"no bf16 GEMM here: {bf16.problem()}")

U = 2.0 ** -8        # bf16 unit roundoff
F32 = 2.0 ** -24     # float32 unit roundoff


def gemm_bound(a, b):
    """The elementwise error bound of a bf16 GEMM of float32 a (M, K) @ b (K, N) (module docstring)."""
    K = a.shape[1]
    return (2 * U + U * U + K * F32) * (np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64))


def test_rounding_is_to_nearest_even_within_half_a_bf16_ulp():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(10_000) * np.exp(rng.uniform(-20, 20, 10_000))).astype(np.float32)  # (n,)
    r = bf16.from_bf16(bf16.to_bf16(x)).astype(np.float64)
    assert np.all(np.abs(r - x) <= U * np.abs(x))
    # exact ties go to the even neighbour; 3.4e38 rounds past the largest bf16 into inf; NaN stays NaN
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.4e38, np.inf], dtype=np.float32)
    assert bf16.from_bf16(bf16.to_bf16(ties)).tolist() == [1.0, 1 + 2**-6, -1.0, np.inf, np.inf]
    assert np.isnan(bf16.from_bf16(bf16.to_bf16(np.array([np.nan], dtype=np.float32))))[0]


def test_rounding_matches_torch_bit_for_bit():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    x = np.random.default_rng(2).standard_normal(4096).astype(np.float32) * 1e3           # (n,)
    want = torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bf16.to_bf16(x), want)


@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
def test_gemm_matches_float64_within_bf16_rounding_bounds(ta, tb):
    rng = np.random.default_rng(3)
    M, K, N = 37, 300, 45
    a = rng.standard_normal((M, K)).astype(np.float32)                                    # (M, K)
    b = rng.standard_normal((K, N)).astype(np.float32)                                    # (K, N)
    a16 = bf16.to_bf16(a.T).T if ta else bf16.to_bf16(a)   # a transposed view of a contiguous array
    b16 = bf16.to_bf16(b.T).T if tb else bf16.to_bf16(b)
    c0 = rng.standard_normal((M, N)).astype(np.float32)                                   # (M, N)
    c = c0.copy()
    bf16.gemm(a16, b16, c, beta=1.0)                                                      # c += a @ b
    want = a.astype(np.float64) @ b.astype(np.float64) + c0
    assert np.all(np.abs(c - want) <= gemm_bound(a, b) + F32 * np.abs(want))
    ab, bb = bf16.from_bf16(a16).astype(np.float64), bf16.from_bf16(b16).astype(np.float64)
    assert np.all(np.abs(c - c0 - ab @ bb) <= K * F32 * (np.abs(ab) @ np.abs(bb)) + F32 * np.abs(c0) * 2)


def test_gemm_runs_on_numbas_threads_whatever_openmp_count_another_library_left():
    """torch.set_num_threads sets OpenMP's thread count in the libgomp it shares with oneDNN, and a
    primitive built under another count splits the work another way (where the split reaches the long
    K of a weight gradient, other bits). The GEMM sets numba's count for itself and gives the caller's back."""
    numba = pytest.importorskip("numba")
    dn = bf16._lib()
    if dn.omp_get is None:
        pytest.skip("this libdnnl does not run on GNU OpenMP")
    rng = np.random.default_rng(4)
    shapes = [(64, 4000, 64), (768, 520, 768), (130, 64, 3072)]  # weight-gradient shapes: long K, small M x N
    operands = [(bf16.to_bf16(rng.standard_normal((K, M)).astype(np.float32)).T,                 # (M, K)
                 bf16.to_bf16(rng.standard_normal((K, N)).astype(np.float32))) for M, K, N in shapes]

    def run():
        bf16._matmul.cache_clear()  # every primitive built now, under the count set
        outs = [np.empty((a.shape[0], b.shape[1]), np.float32) for a, b in operands]      # (M, N)
        for (a, b), out in zip(operands, outs):
            bf16.gemm(a, b, out)
        return outs

    n = numba.get_num_threads()
    dn.omp_set(n)
    want = run()
    dn.omp_set(1)  # as torch.set_num_threads(1) leaves it
    try:
        got = run()
        assert dn.omp_get() == 1
    finally:
        dn.omp_set(n)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)


def test_gemm_refuses_mismatched_shapes_with_a_clear_error():
    a = bf16.to_bf16(np.ones((4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"bf16 gemm: \(4, 3\) @ \(4, 3\)"):
        bf16.gemm(a, a, np.empty((4, 3), dtype=np.float32))


def test_missing_library_is_one_clear_line_and_float32_keeps_working():
    code = ("from minisft.backends import get_backend\n"
            "get_backend('numba', 'float32')\n"
            "try:\n    get_backend('numba', 'bfloat16')\n"
            "except ValueError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, bf16.ENV_LIB: "/no/such/libdnnl.so"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("numba backend, dtype bfloat16: oneDNN at /no/such/libdnnl.so cannot be used")
    assert "minisft[bf16]" in out.stdout


# ---- the numba bf16 kernels against the numpy float32 reference -------------------------------------
@pytest.fixture(scope="module")
def backends():
    return get_backend("numba", "bfloat16"), NumpyBackend("float32")


def test_linear_forward_and_backward_within_bf16_bounds_of_float32(backends):
    nb, ref = backends
    rng = np.random.default_rng(4)
    N, din, dout = 40, 96, 72
    x = rng.standard_normal((N, din)).astype(np.float32)                                  # (N, in)
    w = (rng.standard_normal((din, dout)) * 0.1).astype(np.float32)                       # (in, out)
    b = rng.standard_normal(dout).astype(np.float32)                                      # (out,)
    dy = rng.standard_normal((N, dout)).astype(np.float32)                                # (N, out)
    y = nb.linear_forward(x, w, b)
    assert np.all(np.abs(y - ref.linear_forward(x, w, b)) <= gemm_bound(x, w) + 4 * F32 * np.abs(y))
    dx, dw, db = nb.linear_backward(dy, x, w)
    rdx, rdw, rdb = ref.linear_backward(dy, x, w)
    assert np.all(np.abs(dx - rdx) <= gemm_bound(dy, w.T) + 4 * F32 * np.abs(rdx))
    assert np.all(np.abs(dw - rdw) <= gemm_bound(x.T, dy) + 4 * F32 * np.abs(rdw))
    np.testing.assert_allclose(db, rdb, rtol=1e-5, atol=1e-5)  # the bias gradient is a float32 sum


def test_head_loss_within_bf16_bounds_of_float32(backends):
    nb, ref = backends
    rng = np.random.default_rng(5)
    N, d, V = 30, 64, 1000
    h = rng.standard_normal((N, d)).astype(np.float32)                                    # (N, d)
    w = (rng.standard_normal((V, d)) * 0.05).astype(np.float32)                           # (V, d)
    t = rng.integers(0, V, N)                                                             # (N,)
    t[[3, 17]] = IGNORE_INDEX
    dw = np.zeros((V, d), dtype=np.float32)
    loss, n, dh = nb.head_loss(h, w, t, dw=dw, grad_scale=1 / 28)
    rdw = np.zeros((V, d), dtype=np.float32)
    rloss, rn, rdh = ref.head_loss(h, w, t, dw=rdw, grad_scale=1 / 28)
    # each row's loss moves by at most twice its largest logit error (logsumexp and the target logit)
    logit_err = gemm_bound(h, w.T).max(axis=1)                                            # (N,)
    assert n == rn == 28 and abs(float(loss) - float(rloss)) <= 2 * logit_err[t != IGNORE_INDEX].sum()
    # the gradients pass through two more bf16 roundings (softmax output, then the operands): a few u
    for got, want in ((dh, rdh), (dw, rdw)):
        assert np.linalg.norm(got - want) <= 4 * U * np.linalg.norm(want)
    eval_loss, _, eval_dh = nb.head_loss(h, w, t)
    assert eval_dh is None and abs(float(eval_loss) - float(loss)) <= 1e-4 * abs(float(loss))


def test_adamw_pass_writes_the_weights_bf16_copy_and_the_same_float32_update(backends):
    nb, _ = backends
    f32 = get_backend("numba", "float32")
    rng = np.random.default_rng(6)
    p = rng.standard_normal((64, 48)).astype(np.float32)                                  # (in, out)
    g, m, v = (rng.standard_normal(p.shape).astype(np.float32) for _ in range(3))
    v = np.abs(v)
    p32, m32, v32 = p.copy(), m.copy(), v.copy()
    x = rng.standard_normal((5, 64)).astype(np.float32)
    nb.linear_forward(x, p, None)                                         # makes p's bf16 copy
    nb.adamw_step(p, g, m, v, 1e-2, 0.9, 0.999, 1e-8, 0.1, 3)
    f32.adamw_step(p32, g, m32, v32, 1e-2, 0.9, 0.999, 1e-8, 0.1, 3)
    assert np.array_equal(p, p32) and np.array_equal(m, m32) and np.array_equal(v, v32)
    assert np.array_equal(nb._bf16_weight(p), bf16.to_bf16(p))           # current without a refresh pass
    y = nb.linear_forward(x, p, None)
    assert np.array_equal(y, nb.linear_forward(x, p.copy(), None))       # the copy matches a fresh one


# ---- the whole recipe ---------------------------------------------------------------------------------
def test_fifty_book_steps_in_bf16_track_float32_within_one_percent(tmp_path, book_data):
    # The book's loop and data (gpt2-tiny: the real vocabulary, a tiny body), sequences cut to 48
    # tokens to keep the test short; per-step training loss compared step by step.
    import json

    from minisft.settings import Settings, validate
    from minisft.train import finetune
    losses = {}
    for dtype in ("float32", "bfloat16"):
        s = validate(Settings(model="gpt2-tiny", init="random", data=str(book_data),
                              out=str(tmp_path / dtype), responses=0, eval_freq=1000, eval_iter=1,
                              backend="numba", dtype=dtype, max_steps=50, max_length=48))
        finetune(s, log=lambda *_: None)
        rows = [json.loads(line) for line in open(tmp_path / dtype / "metrics.jsonl")]
        losses[dtype] = np.array([r["loss"] for r in rows if r.get("kind") == "step"])    # (50,)
    assert len(losses["float32"]) == len(losses["bfloat16"]) == 50
    assert np.max(np.abs(losses["bfloat16"] / losses["float32"] - 1)) <= 0.01


def test_lora_in_bfloat16_matches_float32_with_every_linear_and_the_frozen_head_adapted():
    """The bf16 head must still return dh for a frozen head and the head adapter's gradients."""
    from minisft import GPT, GPTConfig, pack_sequences
    from minisft.lora import LoraConfig, attach, parse_targets

    cfg = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_layers=2, n_heads=4)
    sd = GPT(cfg, seed=1).state_dict()
    rng = np.random.default_rng(3)
    lc = LoraConfig(rank=4, alpha=8.0, targets=parse_targets("all"))
    runs = []
    for dtype in ("float32", "bfloat16"):
        model = GPT(cfg, backend="numba", dtype=dtype, params=sd)
        attach(model, lc, seed=2)
        if not runs:  # B starts at zero: fresh values, the same for both, so every path carries gradient
            fresh = {n: np.random.default_rng(4).normal(0, 0.1, size=model.params[n].shape)
                     for n in model.params if n.endswith("lora_B")}
        for n, a in fresh.items():
            model.params[n] = model.B.from_numpy(a)
        batch = pack_sequences([np.random.default_rng(5).integers(0, 97, 20)], [rng.integers(0, 97, 20)]) \
            if not runs else runs[0][2]
        loss_sum, n_valid = model.forward_backward(batch)
        runs.append((loss_sum / n_valid, {n: model.B.to_numpy(g) for n, g in model.grads.items()}, batch))
    (l32, g32, _), (l16, g16, _) = runs
    assert abs(l16 - l32) <= 1e-2 * abs(l32)
    assert set(g16) == set(g32) and any(n.startswith("lm_head") for n in g16)
    for n in g32:  # bf16 operands (8-bit mantissa): a few percent of the gradient's norm
        assert np.linalg.norm(g16[n] - g32[n]) <= 5e-2 * np.linalg.norm(g32[n]), n


@pytest.mark.parametrize("state", ["bf16", "8bit"])
def test_lean_moments_rewrite_the_bf16_weight_copies_the_matmuls_read(state):
    from minisft import GPT, AdamW, GPTConfig, pack_sequences

    model = GPT(GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_layers=1, n_heads=4), backend="numba",
                dtype="bfloat16", seed=1)
    opt = AdamW(model, lr=1e-2, state=state)
    rng = np.random.default_rng(0)
    model.forward_backward(pack_sequences([rng.integers(0, 97, 16)], [rng.integers(0, 97, 16)]))  # makes the copies
    opt.step()
    copies = [(ref(), bits) for ref, bits in model.B._w16.values() if ref() is not None]
    assert copies
    for w, bits in copies:
        np.testing.assert_array_equal(bits, bf16.to_bf16(w))
