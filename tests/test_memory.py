"""Memory options: activation checkpointing, lean AdamW state (bf16, 8-bit block-wise), the memory plan."""
import json

import numpy as np
import pytest

from minisft import GPT, GPTConfig, pack_padded
from minisft import lora, memory
from minisft.backends import quant
from minisft.checkpoint import load_checkpoint, save_checkpoint
from minisft.errors import MinisftError
from minisft.model import param_shapes
from minisft.optim import AdamW
from minisft.settings import Settings, validate
from minisft.train import checkpoints, finetune
from tests.helpers import ALL_BACKENDS, backend_or_skip, book_like_batch, quiet, settings

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


# ---- training with lean moments -------------------------------------------------------------------
def fifty_steps(backend, state, batches):
    """50 AdamW steps of the book's recipe (betas 0.9/0.999, weight decay 0.1 on every tensor, batch
    8) with lr 3e-3 (so a tiny random model moves in 50 steps) -> the 50 step losses."""
    cfg = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_layers=2, n_heads=4)
    model = GPT(cfg, backend=backend, dtype="float32", seed=1)
    opt = AdamW(model, lr=3e-3, weight_decay=0.1, state=state)
    losses = []
    for t in range(50):
        model.zero_grad()
        loss_sum, n = model.forward_backward(batches[t % len(batches)])
        opt.step()
        losses.append(loss_sum / n)
    return np.array(losses)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bf16_and_8bit_moments_track_fp32_moments_within_one_percent_per_step(backend):
    """Four book-like padded batches of 8 (lengths 5-30, -100 after the first end-of-text) in turn;
    the fp32 run's loss falls by over 30%, so a 1% band is a real constraint; the lean runs differ
    from it (the rounding happens) but stay inside the band at every step."""
    backend_or_skip(backend, "float32")
    rng = np.random.default_rng(8)
    batches = [pack_padded(*book_like_batch(rng, 97, list(rng.integers(5, 31, 8)))) for _ in range(4)]
    ref = fifty_steps(backend, "fp32", batches)
    assert ref[-1] < 0.7 * ref[0]
    for state in ("bf16", "8bit"):
        lean = fifty_steps(backend, state, batches)
        assert not np.array_equal(lean, ref), state
        np.testing.assert_array_less(np.abs(lean - ref) / ref, 0.01, err_msg=state)


# ---- checkpoints and resume ------------------------------------------------------------------------
def assert_same_state(a, b):
    """Two (model, AdamW) pairs hold bit-identical weights and optimizer arrays (dtypes included)."""
    for name, w in a[0].state_dict().items():
        assert w.tobytes() == b[0].state_dict()[name].tobytes(), name
    sa, sb = a[1].state_dict(), b[1].state_dict()
    assert set(sa) == set(sb) and sa["state"] == sb["state"] and sa["step"] == sb["step"]
    for key in set(sa) - {"step", "state"}:
        for name, arr in sa[key].items():
            assert arr.dtype == sb[key][name].dtype and arr.tobytes() == sb[key][name].tobytes(), (key, name)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("state", ["bf16", "8bit"])
def test_lean_state_saved_and_resumed_continues_bitwise(tmp_path, backend, state):
    """3 steps, checkpoint, a fresh model and optimizer loaded from it, 3 more == 6 steps straight;
    with dropout and activation checkpointing on. The file holds the state as the optimizer holds it:
    uint16 bfloat16 bits, or uint8 codes and float32 block scales."""
    backend_or_skip(backend, "float32")
    cfg = GPTConfig(**TINY, drop_rate=0.1)
    rng = np.random.default_rng(9)
    batches = [pack_padded(*book_like_batch(rng, cfg.vocab_size, list(rng.integers(3, 20, 4)))) for _ in range(6)]

    def steps(model, opt, todo):
        for b in todo:
            model.zero_grad()
            model.forward_backward(b)
            opt.step()

    def fresh():
        model = GPT(cfg, backend=backend, dtype="float32", seed=2)
        model.grad_checkpoint = True
        return model, AdamW(model, lr=1e-2, state=state)
    whole = fresh()
    steps(*whole, batches)
    part = fresh()
    steps(*part, batches[:3])
    path = save_checkpoint(tmp_path / "ck.h5", *part)
    resumed = fresh()
    load_checkpoint(path, model=resumed[0], optimizer=resumed[1])
    steps(*resumed, batches[3:])
    assert_same_state(resumed, whole)
    import h5py
    with h5py.File(path) as f:
        assert f["adam/m/wte.weight"].dtype == (np.uint16 if state == "bf16" else np.uint8)
        assert ("adam/m_scale" in f) == (state == "8bit")


def test_a_finetune_run_with_lean_state_resumes_bitwise_and_records_its_peak_memory(tmp_path, book_data):
    """The settings reach the model and optimizer, and a resumed run restores them: 2 steps + resume
    to 4 == 4 steps straight (8-bit moments, activation checkpointing, dropout; the book's first 60
    records). Every step record and the summary carry the peak RSS so far."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps(json.loads(book_data.read_text())[:60]))
    kw = dict(lr=1e-3, drop_rate=0.1, optim_state="8bit", grad_checkpoint=True, ckpt_every=2)
    summary = finetune(settings(tmp_path / "whole", data, max_steps=4, **kw), log=quiet)
    part = settings(tmp_path / "part", data, max_steps=2, **kw)
    finetune(part, log=quiet)
    finetune(validate(Settings(**{**part.to_dict(), "max_steps": 4, "resume": True})), log=quiet)
    a = load_checkpoint(checkpoints(tmp_path / "whole" / "run")[-1])
    b = load_checkpoint(checkpoints(tmp_path / "part" / "run")[-1])
    assert a[1].state == "8bit" and a[1].step_count == 4
    assert_same_state(a, b)

    steps = [r for r in map(json.loads, open(tmp_path / "whole" / "run" / "metrics.jsonl")) if r["kind"] == "step"]
    assert len(steps) == 4 and all(r["peak_rss_mb"] > 50 for r in steps)
    assert summary["peak_rss_mb"] >= steps[-1]["peak_rss_mb"] and summary["memory_estimate_mb"] > 0
    assert json.loads((tmp_path / "whole" / "run" / "summary.json").read_text())["peak_rss_mb"] == \
        summary["peak_rss_mb"]


# ---- the memory plan -----------------------------------------------------------------------------------
def test_the_estimate_counts_each_part_by_its_formula():
    cfg = GPTConfig.preset("gpt2-tiny")
    n = GPT.num_params(type("M", (), {"cfg": cfg})())
    plain = memory.estimate(cfg, 1000)
    lean = memory.estimate(cfg, 1000, optim_state="8bit", grad_checkpoint=True)
    assert plain["weights"] == plain["gradients"] == 4 * n and plain["moments"] == 8 * n
    blocks = sum(quant.n_blocks(int(np.prod(s))) for s in param_shapes(cfg).values())
    assert lean["moments"] == 2 * n + 8 * blocks
    assert memory.estimate(cfg, 1000, optim_state="bf16")["moments"] == 4 * n
    d, L = cfg.emb_dim, cfg.n_layers
    assert plain["activations"] == 4 * (L * 1000 * 16 * d + 4 * 1000 * d)
    assert lean["activations"] == 4 * (L * 1000 * d + 1000 * 16 * d + 4 * 1000 * d)


def test_dry_run_refuses_before_building_the_model_naming_the_options(tmp_path, book_data, monkeypatch):
    """With too little memory available: a one-line refusal naming the estimate, what is available,
    and the settings that would shrink it; no model is built and no run directory is made."""
    import minisft.train as train
    monkeypatch.setattr(memory, "available_bytes", lambda: 10**7)
    monkeypatch.setattr(train, "GPT", lambda *a, **k: pytest.fail("the model was built before the refusal"))
    s = settings(tmp_path, book_data)
    for run in (train.dry_run, train.finetune):
        with pytest.raises(MinisftError) as e:
            run(s, log=quiet)
        msg = str(e.value)
        assert msg.startswith("setting memory_check: the run needs an estimated") and "0.0 GB available" in msg
        assert "--grad-checkpoint" in msg and "--optim-state 8bit" in msg and "--no-memory-check" in msg
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    lines = []
    train.dry_run(validate(Settings(**{**s.to_dict(), "memory_check": False})), log=lines.append)
    assert "estimated memory per part:" in lines[0] and "moments" in lines[0]


def test_a_lora_estimate_is_smaller_by_the_frozen_weights_gradients_and_moments():
    """LoRA rank 8 on gpt2-medium: the adapters add their weights, gradients and moments; every base
    weight's gradient and two moments (12 bytes per parameter) and the frozen head's dW scratch go."""
    cfg, lc = GPTConfig.preset("gpt2-medium"), lora.LoraConfig(rank=8, alpha=8.0)
    parts = lora.plan(cfg, lc)
    n_base = sum(int(np.prod(s)) for s in param_shapes(cfg).values())
    n_adapters = sum(p.rank * (p.n_in + p.n_out) for p in parts)
    full, lean = memory.estimate(cfg, 1000), memory.estimate(cfg, 1000, lora_config=lc)
    assert lean["weights"] == full["weights"] + 4 * n_adapters
    assert lean["gradients"] == 4 * n_adapters and lean["moments"] == 8 * n_adapters
    assert (full["gradients"] + full["moments"]) - (lean["gradients"] + lean["moments"]) == 12 * (n_base - n_adapters)
    assert full["scratch"] - lean["scratch"] == 4 * cfg.vocab_size * cfg.emb_dim
    assert lean["activations"] == full["activations"] + 4 * 1000 * sum(p.rank for p in parts)  # each (N, r)


def test_gpt2_xl_with_lora_rank_8_fits_where_24_gb_are_available_and_the_dry_run_says_so(tmp_path, book_data,
                                                                                        monkeypatch):
    """The README's claim: gpt2-xl trains with LoRA on a 24 GB machine (measured peak 9.06 GB), while
    full fine-tuning does not fit. The dry run's last line is the verdict with its margin."""
    import minisft.train as train
    monkeypatch.setattr(memory, "available_bytes", lambda: 24 * 10**9)
    xl = dict(model="gpt2-xl", init="pretrained")
    lines = []
    parts = train.dry_run(settings(tmp_path, book_data, **xl, lora_rank=8), log=lines.append)
    total = sum(parts.values()) / 1e9
    assert total < 12
    assert lines[-1].splitlines()[-1] == f"fits: {total:.1f} GB of 24.0 GB available on this machine, " \
                                         f"{24 - total:.1f} GB to spare"
    with pytest.raises(MinisftError, match="setting memory_check: the run needs an estimated 3"):
        train.dry_run(settings(tmp_path, book_data, **xl), log=quiet)
    lines = []
    train.dry_run(settings(tmp_path, book_data, **xl, memory_check=False), log=lines.append)
    assert lines[-1].splitlines()[-1].startswith("does not fit: ") and lines[-1].endswith("GB short")
    monkeypatch.setattr(memory, "available_bytes", lambda: 10**9)
    with pytest.raises(MinisftError) as e:  # the lean options do not apply to LoRA: not suggested
        train.dry_run(settings(tmp_path, book_data, **xl, lora_rank=8), log=quiet)
    assert "--grad-checkpoint" in str(e.value) and "--optim-state" not in str(e.value) and \
        "--fused-update" not in str(e.value)


# ---- fused updates ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("tie", [False, True])
def test_fused_updates_in_the_backward_equal_backward_then_step_bitwise(backend, tie):
    """3 steps with each tensor updated as soon as its gradient is complete == forward_backward then
    AdamW.step: weights and moments bit for bit (8-bit moments, checkpointing, dropout; tied and
    untied heads, where the tied head's gradient completes only after the embeddings')."""
    backend_or_skip(backend, "float32")
    cfg = GPTConfig(**TINY, drop_rate=0.1, tie_embeddings=tie)
    rng = np.random.default_rng(10)
    batches = [pack_padded(*book_like_batch(rng, cfg.vocab_size, list(rng.integers(3, 20, 4)))) for _ in range(3)]
    runs = []
    for fused in (False, True):
        model = GPT(cfg, backend=backend, dtype="float32", seed=3)
        model.grad_checkpoint = True
        opt = AdamW(model, lr=1e-2, state="8bit")
        for b in batches:
            if fused:
                opt.fused_step(b)
                assert model.grads == {}  # nothing kept after the step
            else:
                model.zero_grad()
                model.forward_backward(b)
                opt.step()
        runs.append((model, opt))
    assert_same_state(*runs)


@pytest.mark.parametrize("bad, words", [
    (dict(fused_update=True, grad_accum=2), "setting fused-update: needs --grad-accum 1 and no --grad-clip"),
    (dict(fused_update=True, grad_clip=1.0), "setting fused-update: needs --grad-accum 1 and no --grad-clip"),
    (dict(optim_state="8bit", dtype="float64"), "setting optim-state: 8bit moments need float32 master weights"),
    (dict(optim_state="int4"), "setting optim-state: 'int4' is not one of fp32, bf16, 8bit"),
])
def test_memory_settings_that_cannot_work_are_refused_naming_the_setting(tmp_path, book_data, bad, words):
    with pytest.raises(MinisftError, match=words.replace("-", "[-]")):
        settings(tmp_path, book_data, **bad)
