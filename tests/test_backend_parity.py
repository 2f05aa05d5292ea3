"""Every kernel of every other backend against the numpy reference, and the whole model too.

Fresh random inputs, run through numpy and through the backend under test in the same dtype; every
output must agree norm-relatively within 1e-5 in float32 and 1e-10 in float64, and come back in
that dtype (a float32 kernel silently computing in float64 would be slow, so it fails here too).
Sizes are chosen to straddle the fast backends' chunking: row counts that are not multiples of a
chunk, several sequences of unequal length, repeated tokens.
"""
import numpy as np
import pytest

from minisft import GPT, AdamW, GPTConfig, pack_padded
from minisft.batch import IGNORE_INDEX
from tests.helpers import ALL_BACKENDS, PARITY_TOL, backend_or_skip, check_parity, rel_err, same_on_one_thread
from tests.helpers import book_like_batch

OTHER_BACKENDS = [b for b in ALL_BACKENDS if b != "numpy"]


@pytest.fixture(params=OTHER_BACKENDS)
def name(request):
    return request.param


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    return request.param


@pytest.fixture
def pair(name, dtype):
    """(reference numpy backend, backend under test), both in dtype."""
    return backend_or_skip("numpy", dtype), backend_or_skip(name, dtype)


@pytest.fixture
def rng():
    return np.random.default_rng(20261121)




def run_both(R, B, kernel, *args, arrays=()):
    """Call kernel on both backends; positional args listed in `arrays` are float numpy arrays
    converted per backend, the rest are passed as they are."""
    def conv(X):
        return [X.from_numpy(a) if i in arrays else a for i, a in enumerate(args)]
    return getattr(R, kernel)(*conv(R)), getattr(B, kernel)(*conv(B))


LENGTHS = [37, 1, 64, 20, 45, 33]   # 200 positions, 6 sequences of unequal length
H, HD = 6, 12
D = H * HD                           # 72: not a multiple of a column block


def test_embedding_matches_numpy(pair, rng):
    R, B = pair
    V, C, N = 50, 64, 200
    tokens = rng.integers(0, V, N)   # 200 draws from 50 ids: many repeats race in a naive scatter
    positions = rng.integers(0, C, N)
    wte, wpe = rng.normal(size=(V, D)), rng.normal(size=(C, D))
    outs = [X.embedding_forward(X.index(tokens), X.index(positions), X.from_numpy(wte), X.from_numpy(wpe))
            for X in (R, B)]
    check_parity(R, B, *outs, "embedding_forward")

    dx = rng.normal(size=(N, D))
    dwte0, dwpe0 = rng.normal(size=(V, D)), rng.normal(size=(C, D))  # the kernel adds into these
    bufs = []
    for X in (R, B):
        dwte, dwpe = X.from_numpy(dwte0), X.from_numpy(dwpe0)
        X.embedding_backward(dwte, dwpe, X.from_numpy(dx), X.index(tokens), X.index(positions))
        bufs.append((dwte, dwpe))
    check_parity(R, B, *bufs, "embedding_backward")


def test_layernorm_forward_and_backward_match_numpy(pair, rng):
    R, B = pair
    x = rng.normal(size=(200, D)) * 2.5 + 0.7
    w, b = rng.normal(size=D), rng.normal(size=D)
    fwd = run_both(R, B, "layernorm_forward", x, w, b, arrays=(0, 1, 2))
    check_parity(R, B, *fwd, "layernorm_forward")
    dout, dskip = rng.normal(size=x.shape), rng.normal(size=x.shape)
    # Each backend's backward gets its own forward's saved statistics.
    bwd = [X.layernorm_backward(X.from_numpy(dout), X.from_numpy(x), X.from_numpy(w), f[1], f[2])
           for X, f in zip((R, B), fwd)]
    check_parity(R, B, *bwd, "layernorm_backward")
    # The skip path's gradient, added in the same pass: dx grows by exactly dskip.
    with_skip = [X.layernorm_backward(X.from_numpy(dout), X.from_numpy(x), X.from_numpy(w), f[1], f[2],
                                      dskip=X.from_numpy(dskip)) for X, f in zip((R, B), fwd)]
    check_parity(R, B, *with_skip, "layernorm_backward with dskip")
    np.testing.assert_array_equal(R.to_numpy(with_skip[0][0]), R.to_numpy(bwd[0][0]) + R.to_numpy(R.from_numpy(dskip)))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("need_dw", [True, False])
def test_linear_forward_and_backward_match_numpy(pair, rng, bias, need_dw):
    R, B = pair
    x, w = rng.normal(size=(200, D)), rng.normal(size=(D, 3 * D))
    b = rng.normal(size=3 * D) if bias else None
    ref, got = (X.linear_forward(X.from_numpy(x), X.from_numpy(w), None if b is None else X.from_numpy(b))
                for X in (R, B))
    check_parity(R, B, ref, got, "linear_forward")
    dy = rng.normal(size=(200, 3 * D))
    ref, got = run_both(R, B, "linear_backward", dy, x, w, need_dw, arrays=(0, 1, 2))
    assert (got[1] is None) == (not need_dw)
    keep = [0, 1, 2] if need_dw else [0, 2]
    check_parity(R, B, [ref[i] for i in keep], [got[i] for i in keep], "linear_backward")


@pytest.mark.parametrize("lengths", [LENGTHS, [64] * 3])
def test_attention_forward_and_backward_match_numpy_on_unequal_sequences(pair, rng, lengths):
    R, B = pair
    cu = np.concatenate([[0], np.cumsum(lengths)])
    N = int(cu[-1])
    qkv = rng.normal(size=(N, 3 * D))
    fwd = [X.attention_forward(X.from_numpy(qkv), X.index(cu), H, max(lengths)) for X in (R, B)]
    check_parity(R, B, fwd[0][0], fwd[1][0], "attention_forward")
    dout = rng.normal(size=(N, D))
    bwd = [X.attention_backward(X.from_numpy(dout), X.from_numpy(qkv), f[0], f[1], X.index(cu), H, max(lengths))
           for X, f in zip((R, B), fwd)]
    check_parity(R, B, *bwd, "attention_backward")


def test_gelu_forward_and_backward_match_numpy(pair, rng):
    R, B = pair
    x = rng.normal(size=(200, 4 * D)) * 3   # reaches the tails, where tanh saturates
    check_parity(R, B, *run_both(R, B, "gelu_forward", x, arrays=(0,)), "gelu_forward")
    dy = rng.normal(size=x.shape)
    check_parity(R, B, *run_both(R, B, "gelu_backward", dy, x, arrays=(0, 1)), "gelu_backward")


def test_residual_forward_and_backward_match_numpy(pair, rng):
    R, B = pair
    a, b = rng.normal(size=(200, D)), rng.normal(size=(200, D))
    check_parity(R, B, *run_both(R, B, "residual_forward", a, b, arrays=(0, 1)), "residual_forward")
    check_parity(R, B, *run_both(R, B, "residual_backward", a, arrays=(0,)), "residual_backward")


def test_dropout_masks_and_backward_match_numpy(pair, rng):
    R, B = pair
    x, dy, p = rng.normal(size=(200, D)), rng.normal(size=(200, D)), 0.25
    y, mask = B.dropout_forward(B.from_numpy(x), p, B.rng(3))
    m = B.to_numpy(mask)
    assert set(np.unique(m)) == {0.0, np.dtype(B.dtype).type(1.0 / (1.0 - p))}
    # The mask's draw is the backend's own; given the mask, both sides must agree exactly.
    check_parity(R, B, R.from_numpy(x * m), y, "dropout_forward")
    check_parity(R, B, R.dropout_backward(R.from_numpy(dy), R.from_numpy(m)),
          B.dropout_backward(B.from_numpy(dy), mask), "dropout_backward")


@pytest.mark.parametrize("n_rows", [13, 300])
def test_fused_head_loss_and_logits_match_numpy_with_ignored_targets(pair, rng, n_rows):
    R, B = pair
    V, scale = 300, 0.37
    h, w = rng.normal(size=(n_rows, D)), rng.normal(size=(V, D)) * 0.3
    targets = rng.integers(0, V, n_rows)
    targets[rng.random(n_rows) < 0.3] = IGNORE_INDEX
    dw0 = rng.normal(size=(V, D))
    outs = []
    for X in (R, B):
        dw = X.from_numpy(dw0)
        loss, n, dh = X.head_loss(X.from_numpy(h), X.from_numpy(w), X.index(targets), dw=dw, grad_scale=scale)
        outs.append((float(X.item(loss)), n, dh, X.to_numpy(dw).astype(np.float64) - dw0))
    (l_r, n_r, dh_r, dw_r), (l_b, n_b, dh_b, dw_b) = outs
    assert n_b == n_r
    assert abs(l_b - l_r) <= PARITY_TOL[B.dtype] * abs(l_r)
    check_parity(R, B, dh_r, dh_b, "head_loss dh")
    # dw's increment (the start, random and of the increment's size, cast the same way on both sides)
    assert rel_err(dw_b, dw_r) <= PARITY_TOL[B.dtype], "head_loss dw"
    # Evaluation: no gradient, the same loss.
    ev = [X.head_loss(X.from_numpy(h), X.from_numpy(w), X.index(targets)) for X in (R, B)]
    assert ev[1][2] is None and ev[1][1] == n_r
    assert abs(float(B.item(ev[1][0])) - l_r) <= PARITY_TOL[B.dtype] * abs(l_r)
    check_parity(R, B, *run_both(R, B, "head_logits", h, w, arrays=(0, 1)), "head_logits")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_head_loss_writes_a_fresh_dw_outright_as_if_it_had_held_zeros(backend, dtype, rng, monkeypatch):
    """dw_fresh: the buffer's old contents (NaN here) never reach the result, with one row chunk or
    several (64 rows at a time), and the result is bit for bit the zero-initialised one's."""
    from minisft.backends import numba_backend, numpy_backend
    X = backend_or_skip(backend, dtype)
    V, n_rows = 300, 250
    h, w = rng.normal(size=(n_rows, D)), rng.normal(size=(V, D)) * 0.3
    targets = rng.integers(0, V, n_rows)
    targets[rng.random(n_rows) < 0.2] = IGNORE_INDEX                                      # ~200 valid rows
    for rows_per_chunk in (n_rows, 64):
        monkeypatch.setattr(numpy_backend, "HEAD_CHUNK_ROWS", rows_per_chunk)
        monkeypatch.setattr(numba_backend, "HEAD_CHUNK_BYTES", rows_per_chunk * V * np.dtype(dtype).itemsize)
        if backend == "torch":
            X.head_chunk_rows = rows_per_chunk
        got = []
        for fill, fresh in ((0.0, False), (np.nan, True)):
            dw = X.from_numpy(np.full((V, D), fill))                                      # (V, d)
            X.head_loss(X.from_numpy(h), X.from_numpy(w), X.index(targets), dw=dw, grad_scale=0.5, dw_fresh=fresh)
            got.append(X.to_numpy(dw))
        assert np.isfinite(got[1]).all(), f"{rows_per_chunk} rows a chunk: the old contents leaked into dw"
        np.testing.assert_array_equal(got[1], got[0])
    dw = X.from_numpy(np.full((V, D), np.nan))             # no valid target at all: a fresh dw is zeros
    X.head_loss(X.from_numpy(h), X.from_numpy(w), X.index(np.full(n_rows, IGNORE_INDEX)), dw=dw, need_dh=True,
                dw_fresh=True)
    assert not X.to_numpy(dw).any()


def test_adamw_global_norm_and_scale_match_numpy(pair, rng):
    R, B = pair
    shape = (37, 29)
    p, g, m = rng.normal(size=shape), rng.normal(size=shape), rng.normal(size=shape) * 0.1
    v = rng.random(shape) * 0.01
    states = []
    for X in (R, B):
        arrs = [X.from_numpy(a) for a in (p, g, m, v)]
        X.adamw_step(*arrs, lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=4)
        states.append([arrs[0], arrs[2], arrs[3]])  # p, m, v after the update
    check_parity(R, B, *states, "adamw_step")

    gs = [rng.normal(size=(50, 7)), rng.normal(size=300), rng.normal(size=(3, 4, 5))]
    norms = [X.global_norm([X.from_numpy(a) for a in gs]) for X in (R, B)]
    assert abs(norms[1] - norms[0]) <= PARITY_TOL[B.dtype] * norms[0]
    scaled = []
    for X in (R, B):
        arrs = [X.from_numpy(a) for a in gs]
        X.scale_(arrs, 0.3)
        scaled.append(arrs)
    check_parity(R, B, *scaled, "scale_")


# ---- the whole model ---------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [False, True])
def test_whole_model_and_three_adamw_steps_match_numpy(name, dtype, tie):
    """Loss, logits, every gradient and the parameters after each of 3 AdamW steps, each on a new
    book-like batch packed without its padding. The model has no qkv bias: the key bias's gradient
    is zero in exact arithmetic (softmax ignores a constant added to a row's scores), so each
    backend's rounding noise there has an arbitrary sign, and AdamW, which normalises magnitudes,
    would turn those signs into differences of 2*lr in the parameters."""
    backend_or_skip(name, dtype)
    cfg = GPTConfig(vocab_size=97, context_length=40, emb_dim=32, n_layers=2, n_heads=4, qkv_bias=False,
                    tie_embeddings=tie)
    rng = np.random.default_rng(7)
    ref = GPT(cfg, backend="numpy", dtype=dtype, seed=1)
    sd = {n: a + rng.normal(0, 0.05, a.shape) for n, a in ref.state_dict().items()}
    ref.load_state_dict(sd)
    model = GPT(cfg, backend=name, dtype=dtype, seed=1)
    model.load_state_dict(sd)
    opts = [AdamW(m, lr=1e-3, weight_decay=0.1) for m in (ref, model)]
    tol = PARITY_TOL[dtype]

    inputs, _ = book_like_batch(rng, cfg.vocab_size, [30, 12, 25])
    assert rel_err(model.logits(inputs), ref.logits(inputs)) <= tol
    for step in range(3):
        inputs, targets = book_like_batch(rng, cfg.vocab_size, list(rng.integers(2, 39, 4)))
        batch = pack_padded(inputs, targets)
        losses = []
        for m in (ref, model):
            m.zero_grad()
            losses.append(m.forward_backward(batch)[0])
        assert abs(losses[1] - losses[0]) <= tol * losses[0], f"step {step + 1}: loss"
        assert set(model.grads) == set(ref.grads)
        for n, g in ref.grads.items():
            assert rel_err(model.B.to_numpy(model.grads[n]), g) <= tol, f"step {step + 1}: grad {n}"
        for opt in opts:
            opt.step()
        ours, theirs = model.state_dict(), ref.state_dict()
        for n in theirs:
            assert ours[n].dtype == np.dtype(dtype)
            assert rel_err(ours[n], theirs[n]) <= tol, f"step {step + 1}: param {n}"


# ---- the numba backend's own machinery -----------------------------------------------------------------
def test_numba_head_loss_across_row_chunks(monkeypatch, dtype, rng):
    """Force the fused head into several row chunks (64 rows of logits at a time), twice: the
    second call must leave the first call's results alone."""
    from minisft.backends import numba_backend as nb
    R, B = backend_or_skip("numpy", dtype), backend_or_skip("numba", dtype)
    V = 300
    monkeypatch.setattr(nb, "HEAD_CHUNK_BYTES", 64 * V * np.dtype(dtype).itemsize)
    results = []
    for _ in range(2):
        h, w = rng.normal(size=(250, D)), rng.normal(size=(V, D)) * 0.3
        targets = rng.integers(0, V, 250)
        targets[rng.random(250) < 0.2] = IGNORE_INDEX  # about 200 valid rows: 4 chunks
        dw0 = rng.normal(size=(V, D))
        outs = []
        for X in (R, B):
            dw = X.from_numpy(dw0)
            loss, n, dh = X.head_loss(X.from_numpy(h), X.from_numpy(w), X.index(targets), dw=dw, grad_scale=0.5)
            outs.append((float(loss), dh, X.to_numpy(dw).astype(np.float64) - dw0))
        assert abs(outs[1][0] - outs[0][0]) <= PARITY_TOL[dtype] * abs(outs[0][0])
        check_parity(R, B, outs[0][1], outs[1][1], "dh")
        assert rel_err(outs[1][2], outs[0][2]) <= PARITY_TOL[dtype], "dw"
        results.append((outs[1][1].copy(), outs[1][1]))
    np.testing.assert_array_equal(results[0][1], results[0][0])  # the first dh survived the second call


def test_numba_reductions_do_not_depend_on_the_thread_count(dtype, rng):
    """Column sums (layernorm dw/db, bias gradients) and the embedding scatter are split into fixed
    chunks, not one per thread: one thread and all threads give bit-identical results."""
    pytest.importorskip("numba")
    B = backend_or_skip("numba", dtype)
    x, dout = rng.normal(size=(200, D)), rng.normal(size=(200, D))
    w, b = rng.normal(size=D), rng.normal(size=D)
    tokens, positions = rng.integers(0, 20, 200), rng.integers(0, 64, 200)

    def run():
        f = B.from_numpy
        _, mean, rstd = B.layernorm_forward(f(x), f(w), f(b))
        ln = B.layernorm_backward(f(dout), f(x), f(w), mean, rstd)
        lin = B.linear_backward(f(dout), f(x), f(np.eye(D)))
        dwte, dwpe = B.zeros_like(f(np.zeros((20, D)))), B.zeros_like(f(np.zeros((64, D))))
        B.embedding_backward(dwte, dwpe, f(dout), B.index(tokens), B.index(positions))
        return [*ln, lin[2], dwte, dwpe]

    same_on_one_thread(run)
