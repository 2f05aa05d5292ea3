"""LoRA (minisft/lora.py): the kernels against finite differences and the numpy reference, the whole
adapted model against a PyTorch-autograd LoRA GPT, frozen base weights, adapter-only checkpoints with
exact resume, and bad input refused by name.

Tolerances: finite differences (float64) <= 1e-7 norm-relative (as tests/test_kernels_fd.py);
backends vs numpy (float32) <= 1e-5; the whole model vs autograd (float32): loss <= 1e-5 relative,
every adapter gradient <= 1e-4 norm-relative.
"""
import json

import numpy as np
import pytest

from minisft import GPT, AdamW, GPTConfig
from minisft import lora
from minisft.batch import IGNORE_INDEX
from minisft.errors import MinisftError
from minisft.settings import Settings, validate
from minisft.train import checkpoints, finetune
from tests.helpers import (ALL_BACKENDS, backend_or_skip, book_like_batch, fd_check, interrupted_run, quiet,
                           read_metrics, rel_err, settings)

CFG = dict(vocab_size=50257, context_length=32, emb_dim=32, n_layers=2, n_heads=4)
EVERY_TARGET = ("c_attn.q", "c_attn.v", "attn.c_proj", "c_fc", "mlp.c_proj", "lm_head")


@pytest.fixture
def rng():
    return np.random.default_rng(4321)


def lora_linear(B, x, w, bias, a, b, scale, col, p, seed):
    """The adapted linear as the model runs it: y = x W + bias, y[:, cols] += scale dropout(x) A B.
    The dropout mask is drawn from a fixed seed, so every call sees the same one."""
    y = B.linear_forward(x, w, bias)
    xd, mask = B.dropout_forward(x, p, np.random.default_rng(seed)) if p else (x, None)
    u = B.lora_forward(y, xd, a, b, scale, col)
    return y, (xd, mask, u)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("col,n_out", [(0, 24), (8, 8), (16, 8)])  # whole c_attn (3 x 8), its k part, its v part
def test_lora_linear_backward_matches_finite_differences(backend, p, col, n_out, rng):
    B = backend_or_skip(backend, "float64")
    N, n_in, r, scale = 7, 8, 3, 1.7
    inputs = dict(x=rng.normal(size=(N, n_in)), a=rng.normal(size=(n_in, r)), b=rng.normal(size=(r, n_out)))
    w, bias = rng.normal(size=(n_in, 24)), rng.normal(size=24)
    G = rng.normal(size=(N, 24))

    def f(x, a, b):
        y, _ = lora_linear(B, B.from_numpy(x), B.from_numpy(w), B.from_numpy(bias), B.from_numpy(a),
                           B.from_numpy(b), scale, col, p, seed=5)
        return float(np.sum(B.to_numpy(y) * G))

    X = {k: B.from_numpy(v) for k, v in inputs.items()}
    _, (xd, mask, u) = lora_linear(B, X["x"], B.from_numpy(w), B.from_numpy(bias), X["a"], X["b"], scale, col, p, 5)
    dy = B.from_numpy(G)
    dx, _, _ = B.linear_backward(dy, X["x"], B.from_numpy(w), need_dw=False)
    dxd, da, db = B.lora_backward(dy, xd, u, X["a"], X["b"], scale, col)
    B.add_(dx, B.dropout_backward(dxd, mask) if mask is not None else dxd)
    if p:
        assert (B.to_numpy(mask) == 0).any()  # the mask really drops
    fd_check(f, inputs, {"x": B.to_numpy(dx), "a": B.to_numpy(da), "b": B.to_numpy(db)}, rng)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_head_adapter_inside_the_fused_head_matches_finite_differences(backend, rng):
    """head_loss(lora=(u, b, du, db)): logits = h W^T + u b; du, db and dh against finite differences,
    the frozen head computing no dW (need_dh)."""
    B = backend_or_skip(backend, "float64")
    N, d, V, r = 9, 6, 11, 2
    inputs = dict(h=rng.normal(size=(N, d)), u=rng.normal(size=(N, r)), b=rng.normal(size=(r, V)))
    w = rng.normal(size=(V, d))
    targets = rng.integers(0, V, N)
    targets[[1, 4]] = IGNORE_INDEX

    def f(h, u, b):
        loss, _, _ = B.head_loss(B.from_numpy(h), B.from_numpy(w), targets,
                                 lora=(B.from_numpy(u), B.from_numpy(b), None, None))
        return B.item(loss) * 0.5

    X = {k: B.from_numpy(v) for k, v in inputs.items()}
    du, db = B.zeros_like(X["u"]), B.zeros_like(X["b"])
    _, _, dh = B.head_loss(X["h"], B.from_numpy(w), targets, grad_scale=0.5, need_dh=True,
                           lora=(X["u"], X["b"], du, db))
    fd_check(f, inputs, {"h": B.to_numpy(dh), "u": B.to_numpy(du), "b": B.to_numpy(db)}, rng)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_lora_down_projection_matches_finite_differences(backend, rng):
    B = backend_or_skip(backend, "float64")
    inputs = dict(x=rng.normal(size=(5, 6)), a=rng.normal(size=(6, 2)))
    G = rng.normal(size=(5, 2))

    def f(x, a):
        return float(np.sum(B.to_numpy(B.lora_down_forward(B.from_numpy(x), B.from_numpy(a), 0.7)) * G))
    dx, da = B.lora_down_backward(B.from_numpy(G), B.from_numpy(inputs["x"]), B.from_numpy(inputs["a"]), 0.7)
    fd_check(f, inputs, {"x": B.to_numpy(dx), "a": B.to_numpy(da)}, rng)


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_lora_kernels_equal_the_numpy_reference(backend, rng):
    B, R = backend_or_skip(backend, "float32"), backend_or_skip("numpy", "float32")
    x, y0 = rng.normal(size=(13, 16)), rng.normal(size=(13, 48))
    a, b, dy = rng.normal(size=(16, 4)), rng.normal(size=(4, 16)), rng.normal(size=(13, 48))
    outs = {}
    for K in (B, R):
        y = K.from_numpy(y0)
        u = K.lora_forward(y, K.from_numpy(x), K.from_numpy(a), K.from_numpy(b), 0.5, 32)
        grads = K.lora_backward(K.from_numpy(dy), K.from_numpy(x), u, K.from_numpy(a), K.from_numpy(b), 0.5, 32)
        outs[K.name] = [K.to_numpy(t) for t in (y, u, *grads)]
    for got, want in zip(outs[backend], outs["numpy"]):
        assert rel_err(got, want) <= 1e-5
    assert np.array_equal(outs["numpy"][0][:, :32], y0[:, :32].astype(np.float32))  # only the part's columns move


def adapted(backend, tie, targets=EVERY_TARGET, dtype="float32", rng=None, **kw):
    """A small GPT with adapters whose B is random (a fresh adapter's B is zero, which would hide bugs)."""
    model = GPT(GPTConfig(**CFG, tie_embeddings=tie), backend=backend, dtype=dtype, seed=0)
    ad = lora.attach(model, lora.LoraConfig(rank=4, alpha=8.0, targets=targets, **kw), seed=1)
    rng = rng or np.random.default_rng(0)
    for p in ad.parts:
        model.params[p.b] = model.B.from_numpy(rng.normal(0, 0.1, (p.rank, p.n_out)))
    return model, ad


def on_a_base(tmp_path, book_data, **kw):
    """Validated settings of a LoRA run on a pretrained base: a gpt2-tiny HF folder under tmp_path (a
    random init is refused for LoRA)."""
    base = tmp_path / "base"
    if not base.exists():
        GPT(GPTConfig.preset("gpt2-tiny"), seed=5).save_pretrained(base)
    return settings(tmp_path, book_data, init="pretrained", weights=str(base), **kw)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("tie,targets", [(False, EVERY_TARGET), (True, ("c_attn", "lm_head")), (False, ("c_attn.k",))])
def test_adapted_model_matches_a_pytorch_autograd_lora_gpt(backend, tie, targets):
    torch = pytest.importorskip("torch", reason="the autograd peer needs torch")
    from minisft.peer import TorchLoraGPT
    backend_or_skip(backend, "float32")
    model, ad = adapted(backend, tie, targets)
    inputs, tgt = book_like_batch(np.random.default_rng(1), CFG["vocab_size"], [12, 5, 20, 9], pad=50256)
    loss, grads = model.loss_and_grad(inputs, tgt)

    peer = TorchLoraGPT(model.cfg, ad.parts)
    peer.load_numpy({n: model.B.to_numpy(model.params[n]) for n in model.frozen})
    peer.load_adapters({n: model.B.to_numpy(model.params[n]) for p in ad.parts for n in (p.a, p.b)})
    x, y = torch.from_numpy(inputs), torch.from_numpy(tgt)
    assert rel_err(model.logits(inputs), peer(x).detach().numpy()) <= 1e-5
    peer_loss = peer.loss(x, y)
    peer_loss.backward()
    assert abs(loss - peer_loss.item()) <= 1e-5 * peer_loss.item()
    want = peer.adapter_grads_numpy()
    assert set(grads) == set(want)  # adapters only: no base weight has a gradient
    for name, g in grads.items():
        assert rel_err(g, want[name]) <= 1e-4, name


def test_fresh_adapters_start_as_the_base_model_with_peft_initialisation():
    base = GPT(GPTConfig(**CFG), seed=0)
    inputs = np.random.default_rng(2).integers(0, CFG["vocab_size"], (2, 9))
    want = base.logits(inputs)
    ad = lora.attach(base, lora.LoraConfig(rank=8, alpha=16.0, targets=lora.MODULES), seed=3)
    assert np.array_equal(base.logits(inputs), want)  # B = 0: step 0 is the base exactly
    for p in ad.parts:
        a = base.params[p.a]
        assert a.shape == (p.n_in, 8) and np.abs(a).max() <= 1 / np.sqrt(p.n_in) and a.std() > 0.4 / np.sqrt(p.n_in)
        assert not base.params[p.b].any()
    assert ad.parts[0].scale == 2.0
    assert lora.LoraConfig(rank=4, alpha=8.0, rslora=True).scale == 4.0


def test_training_changes_only_the_adapters_and_adamw_keeps_only_their_moments(rng):
    model, ad = adapted("numpy", False, dropout=0.2)
    model.cfg = GPTConfig(**CFG, drop_rate=0.1)
    base = {n: model.params[n].copy() for n in model.frozen}
    opt = AdamW(model, lr=1e-2)
    assert set(opt.m) == {n for p in ad.parts for n in (p.a, p.b)}
    before = {n: model.params[n].copy() for n in opt.m}
    for _ in range(3):
        inputs, tgt = book_like_batch(rng, CFG["vocab_size"], [10, 7], pad=50256)
        model.loss_and_grad(inputs, tgt)
        assert set(model.grads) == set(opt.m)  # no gradient buffer for any base weight
        opt.step()
    for n, w in base.items():
        assert model.params[n].tobytes() == w.tobytes(), n
    assert all(not np.array_equal(model.params[n], before[n]) for n in opt.m)
    trainable, total = lora.count_parameters(model)
    assert trainable == sum(before[n].size for n in before) and total == model.num_params() + trainable
    assert lora.trainable_parameters(model).startswith(f"trainable params: {trainable:,d} || all params: {total:,d}")


def test_merge_folds_every_adapter_into_the_weights():
    for tie in (False, True):
        model, _ = adapted("numpy", tie, dtype="float64")
        inputs = np.random.default_rng(3).integers(0, CFG["vocab_size"], (2, 11))
        merged = lora.merge(model)
        assert merged.lora is None and not merged.cfg.tie_embeddings  # a head adapter unties a tied head
        assert rel_err(merged.logits(inputs), model.logits(inputs)) <= 1e-6  # float32 merged weights


# ---- runs: adapter-only checkpoints, exact resume -----------------------------------------------------------
def test_lora_run_resumes_bitwise_and_its_checkpoints_hold_only_adapters(tmp_path, book_data, monkeypatch):
    kw = dict(max_steps=4, ckpt_every=2, lr=1e-3, batch_size=4, drop_rate=0.1, lora_rank=4,
              lora_targets="c_attn.q,c_attn.v,c_fc", lora_dropout=0.1, grad_clip=1.0)
    whole = on_a_base(tmp_path / "whole", book_data, **kw)
    finetune(whole, log=quiet)
    part = on_a_base(tmp_path / "part", book_data, **kw)
    interrupted_run(part, monkeypatch, at_step=4)  # Ctrl-C in step 4: the last checkpoint is step 2
    finetune(validate(Settings(**{**part.to_dict(), "resume": True})), log=quiet)
    assert read_metrics(part.out, False) == read_metrics(whole.out, False)

    import h5py
    ckpt_a, ckpt_b = checkpoints(tmp_path / "whole" / "run")[-1], checkpoints(tmp_path / "part" / "run")[-1]
    with h5py.File(ckpt_a) as fa, h5py.File(ckpt_b) as fb:
        names = sorted(fa["params"])
        assert names and all(".lora_" in n for n in names)  # no base weight copied
        assert len(names) == 2 * 2 * 3  # 2 layers x (q, v, c_fc) x (A, B)
        for g in ("params", "adam/m", "adam/v"):
            for n in names:
                assert fa[g][n][()].tobytes() == fb[g][n][()].tobytes(), (g, n)
    adapter = tmp_path / "whole" / "run" / "adapter"
    assert (adapter / lora.CONFIG_FILE).is_file() and (adapter / lora.WEIGHTS_FILE).is_file()
    assert not (tmp_path / "whole" / "run" / "hf").exists()


def test_lora_on_a_weights_folder_without_model_takes_the_architecture_from_its_config(tmp_path, book_data):
    """--weights DIR --lora-rank 8 (or --lora-preset) without --model: the folder's config.json gives the
    shape, as for full fine-tuning."""
    GPT(GPTConfig.preset("gpt2-tiny", n_layers=1), seed=4).save_pretrained(tmp_path / "w")
    folder = dict(model=None, init="pretrained", weights=str(tmp_path / "w"), max_steps=1, batch_size=2)
    assert len(lora.lora_config(settings(tmp_path, book_data, **folder, lora_preset="book-7.4")).targets) == 5
    s = settings(tmp_path, book_data, **folder, lora_rank=8)
    assert s.model is None
    finetune(s, log=quiet)
    cfg, lc, _ = lora.read_checkpoint_header(checkpoints(tmp_path / "run")[-1])
    assert (cfg.n_layers, cfg.emb_dim, lc.rank) == (1, 64, 8)


def test_a_checkpoint_of_other_base_weights_is_refused(tmp_path, book_data):
    s = on_a_base(tmp_path, book_data, max_steps=1, lora_rank=2, batch_size=2)
    finetune(s, log=quiet)
    other = GPT(GPTConfig.preset("gpt2-tiny"), seed=s.seed + 1)
    lora.attach(other, lora.lora_config(s))
    with pytest.raises(MinisftError, match="trained on other base weights"):
        lora.load_checkpoint(checkpoints(tmp_path / "run")[-1], other)


# ---- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,message", [
    (dict(lora_rank=4, lora_targets="c_attn,q_proj"), "setting lora-targets: unknown target 'q_proj'"),
    (dict(lora_rank=4, lora_targets="c_attn,c_attn.q"), "setting lora-targets: c_attn adapts the whole"),
    (dict(lora_rank=0), r"setting lora-rank: 0 must lie in \[1, 64\]"),
    (dict(lora_rank=65), r"setting lora-rank: 65 must lie in \[1, 64\] for h.0.attn.c_attn"),
    (dict(lora_alpha=8.0), "setting lora-alpha: needs --lora-rank"),
    (dict(lora_rank=4, lora_dropout=1.0), "setting lora-dropout"),
    (dict(lora_preset="book-7.5"), "setting lora-preset: unknown preset"),
])
def test_bad_lora_settings_are_refused_by_name(tmp_path, book_data, kw, message):
    with pytest.raises(MinisftError, match=message):
        settings(tmp_path, book_data, **kw)
    assert not (tmp_path / "run").exists()


def test_the_book_preset_adapts_every_linear_layer_at_rank_16(tmp_path, book_data):
    s = on_a_base(tmp_path, book_data, lora_preset="book-7.4")
    lc = lora.lora_config(s)
    assert (lc.rank, lc.alpha, lc.targets) == (16, 16.0, lora.MODULES)
    assert lora.lora_config(on_a_base(tmp_path, book_data, lora_preset="book-7.4", lora_rank=8)).rank == 8


def test_an_adapter_for_another_base_is_refused_and_the_model_is_left_alone(tmp_path):
    model, _ = adapted("numpy", False)
    lora.save_adapter(model, tmp_path / "ad")
    other = GPT(GPTConfig(**{**CFG, "emb_dim": 48}), seed=0)
    with pytest.raises(MinisftError, match="emb_dim 32 vs 48"):
        lora.load_adapter(other, tmp_path / "ad")
    same_shape = GPT(GPTConfig(**CFG), seed=9)
    with pytest.raises(MinisftError, match="trained on other base weights"):
        lora.load_adapter(same_shape, tmp_path / "ad")
    assert same_shape.lora is None and not same_shape.frozen and len(same_shape.params) == len(
        GPT(GPTConfig(**CFG)).params)
    conf = json.loads((tmp_path / "ad" / lora.CONFIG_FILE).read_text())
    (tmp_path / "ad" / lora.MINISFT_FILE).unlink()  # as PEFT writes it: only shapes can be checked
    (tmp_path / "ad" / lora.CONFIG_FILE).write_text(json.dumps({**conf, "bias": "all"}))
    with pytest.raises(MinisftError, match="bias = 'all' is not supported"):
        lora.load_adapter(same_shape, tmp_path / "ad")


def test_cli_lora_run_then_generate_and_eval_with_its_adapter(tmp_path, book_data):
    """finetune --lora-preset book-7.4 on a local base prints PEFT's trainable-parameter line and writes
    the adapter; eval --weights BASE --adapter DIR equals eval of the run's LoRA checkpoint."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    def minisft(*argv):
        return subprocess.run([sys.executable, "-m", "minisft", *map(str, argv)], cwd=ROOT, capture_output=True,
                              text=True)
    GPT(GPTConfig.preset("gpt2-tiny"), seed=5).save_pretrained(tmp_path / "base")
    data, out = tmp_path / "data.json", tmp_path / "run"
    data.write_text(json.dumps(json.loads(book_data.read_text())[:60]))
    r = minisft("finetune", "--model", "gpt2-tiny", "--weights", tmp_path / "base", "--data", data, "--max-steps", 2,
                "--batch-size", 2, "--lr", 1e-3, "--responses", 0, "--lora-preset", "book-7.4", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "trainable params: 837,904 || all params: 7,387,280 || trainable%: 11.3425" in r.stdout
    conf = json.loads((out / "adapter" / lora.CONFIG_FILE).read_text())
    assert (conf["r"], conf["lora_alpha"], conf["target_modules"]) == (16, 16.0, sorted(lora.MODULES))
    a = minisft("eval", "--weights", tmp_path / "base", "--adapter", out / "adapter", "--data", data, "--split", "val",
                "--json")
    b = minisft("eval", "--checkpoint", checkpoints(out)[-1], "--data", data, "--split", "val", "--json")
    c = minisft("eval", "--weights", tmp_path / "base", "--data", data, "--split", "val", "--json")
    assert a.returncode == b.returncode == c.returncode == 0, a.stderr + b.stderr + c.stderr

    def scores(r):  # the numbers, not the model's name (which says where each came from)
        return {k: v for k, v in json.loads(r.stdout).items() if k != "model"}
    assert scores(a) == scores(b) != scores(c)  # the adapter, not the base
    r = minisft("generate", "--weights", tmp_path / "base", "--adapter", tmp_path / "nowhere", "--data", data,
                "--out", tmp_path / "responses.json")
    assert r.returncode == 2 and "not a LoRA adapter folder" in r.stderr and not (tmp_path / "responses.json").exists()


def minisft_in(cwd, *argv):
    """The CLI run in folder cwd: paths relative to it, as a user's shell gives them."""
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "minisft", *map(str, argv)], cwd=cwd, capture_output=True, text=True)


def test_a_lora_checkpoint_finds_its_base_from_any_folder_and_weights_overrides_it_by_sha256(tmp_path, book_data):
    """Trained with a relative --weights, the checkpoint and adapter record the base's absolute path
    (and sha256): eval runs from another folder. With the base moved, the error names the checkpoint
    and the path it records; --weights BASE with --checkpoint gives the base, and other weights are
    refused by name."""
    GPT(GPTConfig.preset("gpt2-tiny"), seed=5).save_pretrained(tmp_path / "base")
    GPT(GPTConfig.preset("gpt2-tiny"), seed=6).save_pretrained(tmp_path / "other")
    data = tmp_path / "data.json"
    data.write_text(json.dumps(json.loads(book_data.read_text())[:60]))
    r = minisft_in(tmp_path, "finetune", "--model", "gpt2-tiny", "--weights", "base", "--data", data, "--lora-rank", 2,
                   "--max-steps", 1, "--batch-size", 2, "--responses", 0, "--backend", "numpy", "--out", "run")
    assert r.returncode == 0, r.stderr
    ckpt, adapter, elsewhere = checkpoints(tmp_path / "run")[-1], tmp_path / "run" / "adapter", tmp_path / "run"
    _, _, base = lora.read_checkpoint_header(ckpt)
    assert base["path"] == str(tmp_path / "base") and len(base["sha256"]) == 64
    assert json.loads((adapter / lora.CONFIG_FILE).read_text())["base_model_name_or_path"] == str(tmp_path / "base")
    evaluate = ("eval", "--checkpoint", ckpt, "--data", data, "--split", "val", "--backend", "numpy")
    first = minisft_in(elsewhere, *evaluate)
    assert first.returncode == 0, first.stderr

    (tmp_path / "base").rename(tmp_path / "moved")
    merges = (("export", ckpt, tmp_path / "m1", "--merge"), ("export", adapter, tmp_path / "m2", "--merge"))
    for argv in (evaluate, *merges):
        r = minisft_in(elsewhere, *argv)
        source = adapter if argv[1] == adapter else ckpt
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith(f"minisft: error: {source}: the base weights it records, {tmp_path / 'base'}, "
                                   "do not exist; pass --weights BASE"), r.stderr
    moved = minisft_in(elsewhere, *evaluate, "--weights", tmp_path / "moved")
    assert moved.returncode == 0 and moved.stdout == first.stdout, moved.stderr
    r = minisft_in(elsewhere, "export", ckpt, tmp_path / "merged", "--merge", "--weights", tmp_path / "moved")
    assert r.returncode == 0 and (tmp_path / "merged" / "model.safetensors").is_file(), r.stderr
    r = minisft_in(elsewhere, *evaluate, "--weights", tmp_path / "other")
    assert r.returncode == 2 and "trained on other base weights" in r.stderr and f"not on {tmp_path / 'other'}" \
        in r.stderr, r.stderr


def test_a_lora_run_on_a_random_init_is_refused_up_front(tmp_path, book_data):
    """Adapters on a random base would be useless without that base, which is never saved: exit 2 with
    one line, before any work (no run folder)."""
    r = minisft_in(tmp_path, "finetune", "--model", "gpt2-tiny", "--init", "random", "--lora-rank", 8, "--data",
                   book_data, "--max-steps", 1, "--batch-size", 2, "--responses", 0, "--backend", "numpy",
                   "--out", "run")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("minisft: error: setting init: a LoRA run needs pretrained base weights")
    assert not (tmp_path / "run").exists()


def test_adapted_model_with_lora_dropout_matches_finite_differences(rng):
    """The model's adapter path (Lora.forward/backward, the head's adapter in the fused head) with
    dropout on every adapter input, float64: d loss / d (A, B) against central differences (<= 1e-6),
    the dropout masks held fixed by re-seeding the model's RNG before every pass."""
    cfg = GPTConfig(vocab_size=64, context_length=16, emb_dim=16, n_layers=2, n_heads=2)
    model = GPT(cfg, dtype="float64", seed=0)
    ad = lora.attach(model, lora.LoraConfig(rank=2, alpha=3.0, dropout=0.3, targets=EVERY_TARGET), seed=1)
    for p in ad.parts:
        model.params[p.b] = rng.normal(0, 0.3, (p.rank, p.n_out))
    inputs, targets = rng.integers(0, 64, (2, 9)), rng.integers(0, 64, (2, 9))

    def loss():
        model.rng = np.random.default_rng(99)
        value, _ = model.loss_and_grad(inputs, targets)
        return value
    loss()
    grads = {n: g.copy() for n, g in model.grads.items()}
    # A whole model's loss carries more rounding than one kernel's: eps 1e-5, tolerance 1e-6.
    for name in (ad.parts[0].a, ad.parts[1].b, ad.head.a, ad.head.b):  # c_attn.q's A, c_attn.v's B, the head's
        w, num, ana = model.params[name], [], []
        for i in rng.choice(w.size, size=12, replace=False):
            idx = np.unravel_index(i, w.shape)
            old = w[idx]
            w[idx] = old + 1e-5
            plus = loss()
            w[idx] = old - 1e-5
            minus = loss()
            w[idx] = old
            num.append((plus - minus) / 2e-5)
            ana.append(grads[name][idx])
        assert rel_err(ana, num) <= 1e-6, name
