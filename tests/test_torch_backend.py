"""The torch backend against the numpy reference, and what is torch's own: devices, bfloat16 mixed
precision, the choice of fused attention path, host syncs.

Tolerances, norm-relative against the numpy backend in the same dtype on the same inputs:
CPU float64 <= 1e-10, CPU float32 <= 1e-5, CUDA float32 <= 1e-4 (float64 <= 1e-10 everywhere).
bfloat16 (float32 master weights): the training loss stays within 1% of float32's for 20 steps.
CUDA cases are skipped with the reason "CUDA not available" where there is no GPU.
"""
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'minisft[torch]')")

from minisft.backends import get_backend  # noqa: E402
from minisft.backends import torch_backend as tb  # noqa: E402
from minisft.backends.numpy_backend import NumpyBackend  # noqa: E402
from minisft.batch import IGNORE_INDEX  # noqa: E402
from minisft import GPT, AdamW, GPTConfig, pack_sequences  # noqa: E402
from tests.helpers import rel_err  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA not available")
TOL = {("cpu", "float64"): 1e-10, ("cpu", "float32"): 1e-5,
       ("cuda", "float64"): 1e-10, ("cuda", "float32"): 1e-4}
CASES = [("cpu", "float64"), ("cpu", "float32"),
         pytest.param("cuda", "float64", marks=needs_cuda), pytest.param("cuda", "float32", marks=needs_cuda)]


def attention_paths(device, dtype, head_dim):
    """Every attention path that can run on this device, dtype and head size (all are tested)."""
    opts = tb.attention_options(device, tb.DTYPES[dtype][1], head_dim,
                                torch.cuda.get_device_capability() if device == "cuda" else None)
    return [p for p in tb.ATTENTION_PATHS if opts[p] is None]


def check(T, ours, ref, tol, what):
    err = rel_err(T.to_numpy(ours), ref)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol}"


# ---- every kernel against numpy --------------------------------------------------------------------
@pytest.mark.parametrize("device,dtype", CASES)
def test_elementwise_and_dense_kernels_match_numpy(device, dtype):
    T, R, tol = tb.TorchBackend(dtype, device), NumpyBackend(dtype), TOL[device, dtype]
    rng = np.random.default_rng(0)
    N, d, V, C = 37, 24, 29, 16
    r = lambda *s: rng.normal(size=s).astype(dtype)  # noqa: E731
    t = lambda a: T.from_numpy(a)  # noqa: E731

    tokens, positions = rng.integers(0, V, N), rng.integers(0, C, N)  # repeats: a scatter-ADD
    wte, wpe, dx = r(V, d), r(C, d), r(N, d)
    check(T, T.embedding_forward(T.index(tokens), T.index(positions), t(wte), t(wpe)),
          R.embedding_forward(tokens, positions, wte, wpe), tol, "embedding")
    ref_dwte, ref_dwpe = r(V, d), r(C, d)                 # the kernel ADDS into these
    dwte, dwpe = t(ref_dwte), t(ref_dwpe)
    T.embedding_backward(dwte, dwpe, t(dx), T.index(tokens), T.index(positions))
    R.embedding_backward(ref_dwte, ref_dwpe, dx, tokens, positions)
    check(T, dwte, ref_dwte, tol, "dwte")
    check(T, dwpe, ref_dwpe, tol, "dwpe")

    x, w, b, dy = r(N, d) * 3 + 1, r(d), r(d), r(N, d)
    ours, ref = T.layernorm_forward(t(x), t(w), t(b)), R.layernorm_forward(x, w, b)
    for o, e, name in zip(ours, ref, ("ln out", "ln mean", "ln rstd")):
        check(T, o, e, tol, name)
    for o, e, name in zip(T.layernorm_backward(t(dy), t(x), t(w), ours[1], ours[2]),
                          R.layernorm_backward(dy, x, w, ref[1], ref[2]), ("ln dx", "ln dw", "ln db")):
        check(T, o, e, tol, name)

    x, w, b, dy = r(N, d), r(d, 3 * d), r(3 * d), r(N, 3 * d)
    check(T, T.linear_forward(t(x), t(w), t(b)), R.linear_forward(x, w, b), tol, "linear")
    check(T, T.linear_forward(t(x), t(w), None), R.linear_forward(x, w, None), tol, "linear, no bias")
    for o, e, name in zip(T.linear_backward(t(dy), t(x), t(w)), R.linear_backward(dy, x, w),
                          ("linear dx", "linear dw", "linear db")):
        check(T, o, e, tol, name)
    assert T.linear_backward(t(dy), t(x), t(w), need_dw=False)[1] is None

    x, dy = r(N, 4 * d) * 2, r(N, 4 * d)
    check(T, T.gelu_forward(t(x)), R.gelu_forward(x), tol, "gelu")
    check(T, T.gelu_backward(t(dy), t(x)), R.gelu_backward(dy, x), tol, "gelu backward")
    a, b = r(N, d), r(N, d)
    check(T, T.residual_forward(t(a), t(b)), a + b, tol, "residual")
    for o in T.residual_backward(t(a)):
        np.testing.assert_array_equal(T.to_numpy(o), a)

    gs = [r(5, 7), r(11)]
    assert abs(T.global_norm([t(g) for g in gs]) - R.global_norm(gs)) <= tol * R.global_norm(gs)
    arrs = [t(g) for g in gs]
    T.scale_(arrs, 0.3)
    for a, g in zip(arrs, gs):
        check(T, a, 0.3 * g, tol, "scale_")


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("lengths", [[5, 1, 8, 3], [6, 6, 6], [70, 3, 41]])  # gaps, none, long rows
def test_attention_matches_numpy_on_every_path(device, dtype, lengths):
    rng = np.random.default_rng(1)
    H, hd = 3, 8
    d = H * hd
    cu = np.concatenate([[0], np.cumsum(lengths)])
    N, L = int(cu[-1]), max(lengths)
    qkv, dout = rng.normal(size=(N, 3 * d)).astype(dtype), rng.normal(size=(N, d)).astype(dtype)
    R = NumpyBackend(dtype)
    out_ref, ctx_ref = R.attention_forward(qkv, cu, H, L)
    dqkv_ref = R.attention_backward(dout, qkv, out_ref, ctx_ref, cu, H, L)
    for path in attention_paths(device, dtype, hd):
        T = tb.TorchBackend(dtype, device, attention=path)
        assert T.attention_path(hd)[0] == path
        cu_t = T.index(cu)
        out, ctx = T.attention_forward(T.from_numpy(qkv), cu_t, H, L)
        dqkv = T.attention_backward(T.from_numpy(dout), T.from_numpy(qkv), out, ctx, cu_t, H, L)
        check(T, out, out_ref, TOL[device, dtype], f"{path} out")
        check(T, dqkv, dqkv_ref, TOL[device, dtype], f"{path} dqkv")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("lengths", [[33, 5, 20], [tb.CPU_FLASH_F32_MAX_LEN + 9, 7]])  # CPU flash: f32, bf16
def test_bfloat16_attention_matches_float32_numpy_on_every_path(device, lengths):
    """bf16 inputs (as the bf16 linear layers hand them over): each path's output and gradient
    within 1e-2 of the float32 reference on the same rounded inputs (bf16 keeps ~3 digits)."""
    rng = np.random.default_rng(11)
    H, hd = 4, 16
    cu = np.concatenate([[0], np.cumsum(lengths)])
    N, L = int(cu[-1]), max(lengths)
    bf16 = lambda a: torch.from_numpy(a).to(torch.bfloat16).float().numpy()  # noqa: E731
    qkv, dout = bf16(rng.normal(size=(N, 3 * H * hd))), bf16(rng.normal(size=(N, H * hd)))
    R = NumpyBackend("float32")
    out_ref, ctx_ref = R.attention_forward(qkv, cu, H, L)
    dqkv_ref = R.attention_backward(dout, qkv, out_ref, ctx_ref, cu, H, L)
    for path in attention_paths(device, "bfloat16", hd):
        T = tb.TorchBackend("bfloat16", device, attention=path)
        cu_t, qkv_t = T.index(cu), T.from_numpy(qkv).to(torch.bfloat16)
        out, ctx = T.attention_forward(qkv_t, cu_t, H, L)
        dqkv = T.attention_backward(T.from_numpy(dout).to(torch.bfloat16), qkv_t, out, ctx, cu_t, H, L)
        assert out.dtype == dqkv.dtype == torch.bfloat16
        check(T, out, out_ref, 1e-2, f"{path} bf16 out")
        check(T, dqkv, dqkv_ref, 1e-2, f"{path} bf16 dqkv")


def test_cpu_bfloat16_attention_up_to_the_f32_length_is_float32_attention_rounded_once():
    """On the CPU, bf16 attention over sequences up to CPU_FLASH_F32_MAX_LEN runs its bf16 inputs in
    float32 on both padded paths: each output element is within bf16's unit roundoff (|x| * 2^-8) of
    the float64 attention of the same inputs, plus float32's own error near zero. torch's CPU flash
    kernel in bfloat16 misses this by hundreds of units."""
    rng = np.random.default_rng(12)
    H, hd, lengths = 4, 16, [33, 5, 20]
    cu = np.concatenate([[0], np.cumsum(lengths)])
    N, L = int(cu[-1]), max(lengths)
    assert L <= tb.CPU_FLASH_F32_MAX_LEN
    qkv = torch.from_numpy(rng.normal(size=(N, 3 * H * hd))).to(torch.bfloat16)    # (N, 3d)
    R = NumpyBackend("float64")
    ref, _ = R.attention_forward(qkv.double().numpy(), cu, H, L)                   # (N, d)
    for path in attention_paths("cpu", "bfloat16", hd):
        T = tb.TorchBackend("bfloat16", "cpu", attention=path)
        out, _ = T.attention_forward(qkv, T.index(cu), H, L)
        err = np.abs(out.double().numpy() - ref)
        assert np.all(err <= np.abs(ref) * 2.0**-8 + 1e-6 * np.abs(ref).max()), f"{path}: {err.max():.2e}"


def test_cpu_flash_attention_under_bfloat16_computes_in_float32_up_to_the_length_then_bfloat16():
    T = tb.TorchBackend("bfloat16", "cpu")
    n = tb.CPU_FLASH_F32_MAX_LEN
    assert T._padded_dtype("cpu-flash-padded", n) == torch.float32
    assert T._padded_dtype("cpu-flash-padded", n + 1) == torch.bfloat16
    assert T._padded_dtype("padded-math", 4 * n) == torch.float32     # math: the store dtype at any length
    assert tb.TorchBackend("float32", "cpu")._padded_dtype("cpu-flash-padded", 4 * n) == torch.float32


@pytest.mark.parametrize("device,dtype", CASES)
def test_head_loss_and_logits_match_numpy(device, dtype):
    T, R, tol = tb.TorchBackend(dtype, device), NumpyBackend(dtype), TOL[device, dtype]
    rng = np.random.default_rng(2)
    n_rows, V, d = T.head_chunk_rows + 157, 41, 16    # more rows than one chunk
    h, w = rng.normal(size=(n_rows, d)).astype(dtype), rng.normal(size=(V, d)).astype(dtype)
    targets = rng.integers(0, V, n_rows)
    targets[rng.random(n_rows) < 0.3] = IGNORE_INDEX
    dw0 = rng.normal(size=(V, d)).astype(dtype)      # the kernel ADDS into dw
    ref_dw = dw0.copy()
    ref_loss, ref_n, ref_dh = R.head_loss(h, w, targets, dw=ref_dw, grad_scale=0.37)
    dw = T.from_numpy(dw0)
    loss, n, dh = T.head_loss(T.from_numpy(h), T.from_numpy(w), targets, dw=dw, grad_scale=0.37)
    assert n == ref_n
    assert abs(T.item(loss) - float(ref_loss)) <= tol * abs(float(ref_loss))
    check(T, dh, ref_dh, tol, "dh")
    check(T, dw, ref_dw, tol, "dw")
    # Without dw: the loss only; targets given as a device array give the same answer (at a sync).
    loss2, n2, dh2 = T.head_loss(T.from_numpy(h), T.from_numpy(w), T.index(targets))
    assert dh2 is None and n2 == n and T.item(loss2) == pytest.approx(T.item(loss), rel=tol)
    check(T, T.head_logits(T.from_numpy(h), T.from_numpy(w)), R.head_logits(h, w), tol, "logits")
    bad = targets.copy()
    bad[3] = V
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 41\)"):
        T.head_loss(T.from_numpy(h), T.from_numpy(w), bad)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("fused", [True, False])
def test_adamw_matches_numpy_fused_and_not(device, dtype, fused):
    T, R, tol = tb.TorchBackend(dtype, device), NumpyBackend(dtype), TOL[device, dtype]
    if fused and T.adamw_problem:
        pytest.skip(T.adamw_problem)
    if not fused:
        T.adamw_problem = "the test asks for the unfused sequence"
    rng = np.random.default_rng(3)
    p = rng.normal(size=(6, 9)).astype(dtype)
    m, v = np.zeros_like(p), np.zeros_like(p)
    pt, mt, vt = T.from_numpy(p), T.from_numpy(m), T.from_numpy(v)
    for step in (1, 2, 3):
        g = rng.normal(size=p.shape).astype(dtype)
        R.adamw_step(p, g, m, v, 1e-2, 0.9, 0.95, 1e-8, 0.1, step)
        T.adamw_step(pt, T.from_numpy(g), mt, vt, 1e-2, 0.9, 0.95, 1e-8, 0.1, step)
    for ours, ref, name in ((pt, p, "p"), (mt, m, "m"), (vt, v, "v")):
        check(T, ours, ref, tol, f"adamw {name}")


@pytest.mark.parametrize("state", ["fp32", "bf16", "8bit"])
def test_bfloat16_matmuls_use_the_weight_as_every_adamw_step_left_it(state):
    """The bf16 weight copies the matmuls reuse are remade after each AdamW update (every optimizer
    state), so the forward and backward always multiply by the current weight."""
    T = tb.TorchBackend("bfloat16", "cpu")
    rng = np.random.default_rng(8)
    x = rng.normal(size=(5, 7)).astype(np.float32)                                      # (N, in)
    model_w = T.from_numpy(rng.normal(size=(7, 3)))                                     # (in, out)
    xt, dy = T.from_numpy(x), T.from_numpy(rng.normal(size=(5, 3)))
    n = model_w.numel()
    if state == "fp32":
        m, v = T.zeros_like(model_w), T.zeros_like(model_w)
    for step in (1, 2, 3):
        T.linear_forward(xt, model_w, None)                                             # makes the copy
        g = T.from_numpy(rng.normal(size=(7, 3)))
        if state == "fp32":
            T.adamw_step(model_w, g, m, v, 0.1, 0.9, 0.95, 1e-8, 0.0, step)
        elif state == "bf16":
            m, v = T.optim_state_zeros(n, "bf16"), T.optim_state_zeros(n, "bf16")
            T.adamw_step_bf16(model_w, g, m, v, 0.1, 0.9, 0.95, 1e-8, 0.0, step, 0)
        else:
            blocks = -(-n // tb.quant.BLOCK)
            qm, qv = T.optim_state_zeros(n, "u8"), T.optim_state_zeros(n, "u8")
            sm, sv = T.optim_state_zeros(blocks, "scale"), T.optim_state_zeros(blocks, "scale")
            T.adamw_step_8bit(model_w, g, qm, sm, qv, sv, 0.1, 0.9, 0.95, 1e-8, 0.0, step)
        w16 = model_w.to(torch.bfloat16)
        assert torch.equal(T.linear_forward(xt, model_w, None), xt.to(torch.bfloat16) @ w16)
        assert torch.equal(T.linear_backward(dy, xt, model_w)[0], dy.to(torch.bfloat16) @ w16.T)


def test_dropout_masks_on_the_cpu_are_the_numpy_backends():
    T, R = tb.TorchBackend("float64", "cpu"), NumpyBackend("float64")
    x = np.random.default_rng(4).normal(size=(50, 12))
    y, mask = T.dropout_forward(T.from_numpy(x), 0.25, T.rng(9))
    y_ref, mask_ref = R.dropout_forward(x, 0.25, R.rng(9))
    np.testing.assert_array_equal(T.to_numpy(mask), mask_ref)
    np.testing.assert_array_equal(T.to_numpy(y), y_ref)


def test_dropout_device_generator_is_seeded_by_the_numpy_rng():
    """The GPU way of drawing masks, run on the CPU: the numpy RNG state alone decides the mask."""
    T = tb.TorchBackend("float32", "cpu")
    T.host_masks = False
    x = T.from_numpy(np.ones((400, 10)))
    rng = T.rng(5)
    state = rng.bit_generator.state
    _, m1 = T.dropout_forward(x, 0.3, rng)
    _, m2 = T.dropout_forward(x, 0.3, rng)
    rng.bit_generator.state = state
    _, m1_again = T.dropout_forward(x, 0.3, rng)
    m1, m2 = T.to_numpy(m1), T.to_numpy(m2)
    np.testing.assert_array_equal(T.to_numpy(m1_again), m1)
    assert not np.array_equal(m1, m2)
    assert set(np.unique(m1)) == {0.0, np.float32(1 / 0.7)}
    assert 0.27 < np.mean(m1 == 0) < 0.33    # 4000 draws: p = 0.3 within 4.5 sigma


# ---- the whole model against numpy -------------------------------------------------------------------
def model_pair(device, dtype, tie, drop_rate):
    cfg = GPTConfig(vocab_size=97, context_length=64, emb_dim=32, n_layers=2, n_heads=4,
                    tie_embeddings=tie, drop_rate=drop_rate)
    ours, ref = GPT(cfg, backend="torch", dtype=dtype, device=device, seed=0), GPT(cfg, dtype=dtype, seed=0)
    rng = np.random.default_rng(6)
    sd = {n: (a + rng.normal(0, 0.05, a.shape)).astype(dtype) for n, a in ref.state_dict().items()}
    ours.load_state_dict(sd)
    ref.load_state_dict(sd)
    return cfg, ours, ref


def packed_batch(rng, V, lengths, learnable=False):
    """Variable-length sequences, some targets -100. Targets are random, or when learnable a fixed
    function of the token (something a model can learn in a few steps)."""
    tokens = [rng.integers(0, V, n) for n in lengths]
    targets = [(t * 7 + 3) % V if learnable else rng.integers(0, V, len(t)) for t in tokens]
    targets = [np.where(rng.random(len(t)) < 0.3, IGNORE_INDEX, t) for t in targets]
    return pack_sequences(tokens, targets)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("tie", [False, True])
def test_whole_model_loss_logits_gradients_and_adamw_match_numpy(device, dtype, tie):
    # On the CPU dropout is on: the torch backend draws the numpy backend's masks.
    drop_rate = 0.1 if device == "cpu" else 0.0
    cfg, ours, ref = model_pair(device, dtype, tie, drop_rate)
    tol = TOL[device, dtype]
    rng = np.random.default_rng(7)
    ids = rng.integers(0, cfg.vocab_size, (3, 20))
    assert rel_err(ours.logits(ids), ref.logits(ids)) <= tol

    opts = [AdamW(m, lr=1e-3, weight_decay=0.1) for m in (ours, ref)]
    for step in range(3):
        batch = packed_batch(rng, cfg.vocab_size, [60, 23, 64, 50, 64, 2])
        losses = []
        for m in (ours, ref):
            m.zero_grad()
            losses.append(m.forward_backward(batch)[0])
        assert abs(losses[0] - losses[1]) <= tol * losses[1], f"step {step + 1}: loss"
        assert set(ours.grads) == set(ref.grads)
        for n, g in ref.grads.items():
            assert rel_err(ours.B.to_numpy(ours.grads[n]), g) <= tol, f"step {step + 1}: grad {n}"
        for opt in opts:
            opt.step()
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    if dtype == "float32":
        # The key third of each c_attn.bias has a zero gradient in exact arithmetic (a shift shared by
        # a whole softmax row changes nothing), so AdamW moves it by rounding noise / eps, differently
        # in any two float32 engines. Checked to be noise, then left out (float64 compares it).
        d = cfg.emb_dim
        for i in range(cfg.n_layers):
            name = f"h.{i}.attn.c_attn.bias"
            g = ref.grads[name]
            assert np.abs(g[d:2 * d]).max() <= 1e-6 * np.abs(g).max()
            for sd in (ours_sd, ref_sd):
                sd[name] = np.delete(sd[name], np.s_[d:2 * d])
    for n, p in ours_sd.items():
        assert rel_err(p, ref_sd[n]) <= tol, f"after 3 AdamW steps: {n}"
    assert ours.loss(batch)[0] == pytest.approx(ref.loss(batch)[0], rel=tol)


# ---- bfloat16 mixed precision -----------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_bfloat16_trains_like_float32_with_float32_master_weights(device):
    """20 AdamW steps from the same weights on the same batches: every bf16 loss within 1% of
    float32's. Parameters, gradients and AdamW moments stay float32."""
    cfg = GPTConfig(vocab_size=211, context_length=64, emb_dim=64, n_layers=2, n_heads=4)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        model = GPT(cfg, backend="torch", dtype=dtype, device=device, seed=1)
        opt = AdamW(model, lr=3e-3, weight_decay=0.1)
        rng = np.random.default_rng(8)
        losses = []
        for _ in range(20):
            batch = packed_batch(rng, cfg.vocab_size, [40, 17, 64, 33], learnable=True)
            model.zero_grad()
            loss_sum, n_valid = model.forward_backward(batch)
            losses.append(loss_sum / n_valid)
            opt.step()
        runs[dtype] = np.array(losses)
        if dtype == "bfloat16":
            assert {p.dtype for p in model.params.values()} == {torch.float32}
            assert {g.dtype for g in model.grads.values()} == {torch.float32}
            assert {a.dtype for a in [*opt.m.values(), *opt.v.values()]} == {torch.float32}
            assert model.state_dict()["wte.weight"].dtype == np.float32
            x = model.B.from_numpy(np.ones((2, cfg.emb_dim)))
            assert model.B.linear_forward(x, model.params["h.0.mlp.c_fc.weight"], None).dtype == torch.bfloat16
    assert runs["float32"][-1] < runs["float32"][0] - 0.3       # it does learn in 20 steps
    assert not np.array_equal(runs["bfloat16"], runs["float32"])  # and bf16 did compute in bf16
    worst = np.max(np.abs(runs["bfloat16"] - runs["float32"]) / runs["float32"])
    assert worst <= 0.01, f"bf16 loss departs from float32 by {worst:.2%}"


# ---- which attention path, and why ---------------------------------------------------------------------
NO_PROBLEMS = dict.fromkeys(tb.OP_PROBLEMS)


def chosen(device, dtype, head_dim=64, capability=None, problems=NO_PROBLEMS):
    why = tb.attention_options(device, dtype, head_dim, capability, problems)
    return next(p for p in tb.ATTENTION_PATHS if why[p] is None), why


def test_attention_path_rules():
    bf16, f32, f64 = torch.bfloat16, torch.float32, torch.float64
    assert chosen("cuda", bf16, capability=(9, 0))[0] == "flash-varlen"
    path, why = chosen("cuda", bf16, capability=(7, 5))             # flash needs Ampere or newer
    assert path == "efficient-varlen" and "compute capability 8.0" in why["flash-varlen"]
    path, why = chosen("cuda", f32, capability=(9, 0))
    assert path == "efficient-varlen" and "needs bfloat16" in why["flash-varlen"]
    path, why = chosen("cuda", f64, capability=(9, 0))
    assert path == "padded-math" and "float32 or bfloat16" in why["efficient-varlen"]
    path, why = chosen("cuda", bf16, head_dim=12, capability=(9, 0))
    assert path == "padded-math" and "multiple of 8" in why["flash-varlen"]
    assert chosen("cuda", f32, head_dim=12, capability=(9, 0))[0] == "efficient-varlen"
    assert chosen("cpu", f32)[0] == "cpu-flash-padded"
    assert chosen("cpu", f64)[0] == "cpu-flash-padded"
    path, why = chosen("mps", f32)
    assert path == "padded-math" and why["cpu-flash-padded"] == "CPU only"
    missing = dict(NO_PROBLEMS, **{"flash-varlen": "no aten._flash_attention_forward"})
    path, why = chosen("cuda", bf16, capability=(9, 0), problems=missing)
    assert path == "efficient-varlen" and why["flash-varlen"] == "no aten._flash_attention_forward"


def test_the_backend_reports_its_attention_path_and_honours_a_forced_one():
    T = tb.TorchBackend("float32", "cpu")
    path, reason = T.attention_path(64)
    if tb.OP_PROBLEMS["cpu-flash-padded"]:
        assert path == "padded-math" and tb.OP_PROBLEMS["cpu-flash-padded"] in reason
    else:
        assert path == "cpu-flash-padded" and "flash-varlen: CUDA only" in reason
    forced = tb.TorchBackend("float32", "cpu", attention="padded-math")
    assert forced.attention_path(64) == ("padded-math", "forced by TorchBackend(attention=...)")
    with pytest.raises(ValueError, match="'flash-varlen' cannot run on cpu float32: CUDA only"):
        tb.TorchBackend("float32", "cpu", attention="flash-varlen").attention_path(64)
    with pytest.raises(ValueError, match="unknown attention path 'fast'"):
        tb.TorchBackend("float32", "cpu", attention="fast")


def test_op_schema_check_notices_a_missing_or_changed_op():
    assert "has no aten._no_such_attention" in tb._op_problem("_no_such_attention", ("query",), (), 1)
    renamed = ("query", "key", "value", "cu_seqlens_q")  # the flash op calls it cum_seq_q
    assert "another signature" in tb._op_problem("_flash_attention_forward", renamed, ("scale",), 5)
    assert "another signature" in tb._op_problem("_flash_attention_forward", tb.FLASH_FWD_ARGS, ("scale",), 4)
    # Every problem found at import is a plain sentence, never an exception.
    assert all(p is None or isinstance(p, str) for p in tb.OP_PROBLEMS.values())


VARLEN_SCHEMAS = [tb._op_problem("_flash_attention_forward", tb.FLASH_FWD_ARGS, ("scale",), 5),
                  tb._op_problem("_flash_attention_backward", tb.FLASH_BWD_ARGS, ("scale",), 3),
                  tb._op_problem("_efficient_attention_forward", tb.EFF_FWD_ARGS, ("scale",), 6)]


@pytest.mark.skipif(any(VARLEN_SCHEMAS), reason="this torch has no varlen attention ops with the expected schemas")
def test_varlen_kernel_calls_have_the_right_shapes_on_the_meta_device():
    """The CUDA fast paths' calls, traced through torch's shape functions: argument order, layouts
    and result shapes (not numerics, which need a GPU: test_attention_matches_numpy_on_every_path)."""
    N, H, hd, S, L = 50, 4, 16, 3, 30
    qkv = torch.empty(N, 3 * H * hd, device="meta", dtype=torch.bfloat16)
    cu32 = torch.empty(S + 1, device="meta", dtype=torch.int32)
    out, saved = tb.flash_varlen_forward(qkv, cu32, H, L, 0.25)
    assert out.shape == (N, H * hd)
    dqkv = tb.flash_varlen_backward(out, qkv, out, saved, cu32, H, L, 0.25)
    assert dqkv.shape == (N, 3 * H * hd)
    # (torch's shape function for _efficient_attention_backward lacks its `out` argument, so only the
    # forward can be traced here.)
    out, (lse, _, _, max_q, max_k) = tb.efficient_varlen_forward(qkv.float(), cu32, H, L, 0.25)
    assert out.shape == (N, H * hd) and lse.shape[:2] == (S, H) and (max_q, max_k) == (L, L)


# ---- devices, errors, autograd, syncs -------------------------------------------------------------------
@pytest.mark.skipif(CUDA, reason="CUDA is available here")
def test_cuda_requested_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="device 'cuda': CUDA is not available"):
        get_backend("torch", "float32", "cuda")
    out = subprocess.run([sys.executable, "-m", "minisft", "bench", "--backend", "torch", "--device", "cuda"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "CUDA is not available" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is available here")
def test_mps_requested_without_mps_is_a_clear_error():
    with pytest.raises(ValueError, match="device 'mps': MPS is not available"):
        get_backend("torch", "float32", "mps")


def test_unknown_device_and_dtype_are_clear_errors():
    with pytest.raises(ValueError, match="unknown torch device 'gpu'"):
        get_backend("torch", "float32", "gpu")
    with pytest.raises(ValueError, match="runs on cpu, cuda or mps"):
        get_backend("torch", "float32", "meta")
    with pytest.raises(ValueError, match="supports float32, float64, bfloat16, not 'float16'"):
        get_backend("torch", "float16", "cpu")


def test_missing_torch_is_a_clear_error():
    code = ("import sys; sys.modules['torch'] = None\n"  # what an environment without torch looks like
            "from minisft.backends import get_backend\n"
            "try:\n    get_backend('torch')\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "the torch backend needs PyTorch, which is not installed: pip install 'minisft[torch]'" in out.stdout


def test_training_never_builds_an_autograd_graph():
    _, model, _ = model_pair("cpu", "float32", False, 0.1)
    model.forward_backward(packed_batch(np.random.default_rng(9), 97, [30, 12]))
    AdamW(model).step()
    assert torch.is_grad_enabled()  # the kernels' no_grad does not leak out
    for t in [*model.params.values(), *model.grads.values()]:
        assert not t.requires_grad and t.grad_fn is None


@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_cuda_training_step_syncs_only_to_read_the_loss(dtype):
    """forward_backward and AdamW.step with torch's sync debugger set to raise; it is switched off
    only where forward_backward reads the loss back (B.item), the step's one sync."""
    cfg = GPTConfig(vocab_size=97, context_length=64, emb_dim=32, n_layers=2, n_heads=4, drop_rate=0.1)
    model = GPT(cfg, backend="torch", dtype=dtype, device="cuda", seed=0)
    opt = AdamW(model)
    batch = packed_batch(np.random.default_rng(10), cfg.vocab_size, [30, 12, 64])
    model.forward_backward(batch)  # warm-up: first allocations, the dropout generator
    opt.step()
    read_loss = model.B.item

    def item(x):
        torch.cuda.set_sync_debug_mode("default")
        return read_loss(x)
    model.B.item = item
    try:
        for _ in range(2):
            model.zero_grad()
            torch.cuda.set_sync_debug_mode("error")
            loss_sum, _ = model.forward_backward(batch)
            torch.cuda.set_sync_debug_mode("error")
            opt.step()
            torch.cuda.set_sync_debug_mode("default")
            assert np.isfinite(loss_sum)
    finally:
        torch.cuda.set_sync_debug_mode("default")
