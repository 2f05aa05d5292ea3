"""HDF5 training checkpoints: a bit-exact round trip of everything a resume needs, proven by
training on after the reload; truncated, incomplete, tampered and mismatched files refused."""
import json

import h5py
import numpy as np
import pytest

from minisft import GPT, AdamW, GPTConfig, __version__, pack_padded
from minisft.batch import IGNORE_INDEX
from minisft.checkpoint import load_checkpoint, rng_from_state, rng_state, save_checkpoint
from minisft.errors import MinisftError

CFG = GPTConfig(vocab_size=97, context_length=32, emb_dim=16, n_layers=2, n_heads=4, drop_rate=0.1)


def batch(seed, B=3, T=10):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, CFG.vocab_size, size=(B, T))  # (B, T)
    y = rng.integers(0, CFG.vocab_size, size=(B, T))  # (B, T)
    y[0, 7:] = IGNORE_INDEX  # some ignored targets, as in real batches
    return pack_padded(x, y)


def train(model, opt, steps, start=0):
    """AdamW steps with dropout on: they use the model's RNG, so a resume must restore it."""
    losses = []
    for s in range(start, start + steps):
        model.zero_grad()
        losses.append(model.forward_backward(batch(s))[0])
        opt.step()
    return losses


def trained(dtype="float32", **cfg):
    cfg = GPTConfig(**{**CFG.to_dict(), **cfg})
    model = GPT(cfg, dtype=dtype, seed=11)
    opt = AdamW(model, lr=3e-3, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.05, decay="matrices")
    train(model, opt, 3)
    return model, opt


def loader_state(rng):
    """What a data loader would save: where it is, and its shuffle RNG (as a JSON dict)."""
    return {"epoch": 1, "batch_index": 17, "order": [4, 0, 3, 1, 2], "shuffle_rng": rng_state(rng)}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_is_bit_exact_and_training_continues_identically(tmp_path, dtype):
    model, opt = trained(dtype)
    shuffle_rng = np.random.default_rng(99)
    shuffle_rng.random(5)  # mid-stream, not at its seed
    state = {"step": 3, "epoch": 0, "loader": loader_state(shuffle_rng),
             "metrics": [{"kind": "step", "step": 3, "loss": np.float32(4.25), "tokens_seen": np.int64(90)}],
             "best_val": float("nan")}
    path = save_checkpoint(tmp_path / "ck.h5", model, opt, state)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.h5"]

    m2, o2, st2 = load_checkpoint(path)
    assert m2.cfg == model.cfg and m2.dtype == dtype
    for n, a in model.state_dict().items():
        b = m2.state_dict()[n]
        assert b.dtype == a.dtype
        np.testing.assert_array_equal(b, a, err_msg=n)
    assert o2.step_count == 3
    assert (o2.lr, o2.betas, o2.eps, o2.weight_decay, o2.decay) == (3e-3, (0.85, 0.99), 1e-7, 0.05, "matrices")
    for key in ("m", "v"):
        for n, a in opt.state_dict()[key].items():
            np.testing.assert_array_equal(o2.state_dict()[key][n], a, err_msg=f"{key}[{n}]")
    assert m2.rng.bit_generator.state == model.rng.bit_generator.state
    assert st2["metrics"] == [{"kind": "step", "step": 3, "loss": 4.25, "tokens_seen": 90}]
    assert np.isnan(st2.pop("best_val")) and np.isnan(state.pop("best_val"))
    assert st2["loader"] == json.loads(json.dumps(state["loader"]))
    resumed_rng = rng_from_state(st2["loader"]["shuffle_rng"])
    np.testing.assert_array_equal(resumed_rng.random(4), shuffle_rng.random(4))

    # The proof: both go on training (dropout draws from the restored RNG) and stay identical.
    losses_a = train(model, opt, 3, start=3)
    losses_b = train(m2, o2, 3, start=3)
    assert losses_a == losses_b
    for n, a in model.state_dict().items():
        np.testing.assert_array_equal(m2.state_dict()[n], a, err_msg=n)


def test_loads_into_an_existing_model_and_optimizer(tmp_path):
    model, opt = trained(tie_embeddings=True, qkv_bias=False)
    model.frozen = {"wpe.weight"}
    opt = AdamW(model, lr=1e-3)  # built after freezing: no state for wpe
    train(model, opt, 2)
    save_checkpoint(tmp_path / "ck.h5", model, opt, {"step": 2})

    fresh = GPT(model.cfg, seed=0)
    fresh.frozen = {"wpe.weight"}
    fresh_opt = AdamW(fresh, lr=5e-4)
    m2, o2, st = load_checkpoint(tmp_path / "ck.h5", model=fresh, optimizer=fresh_opt)
    assert m2 is fresh and o2 is fresh_opt and st == {"step": 2}
    assert fresh.frozen == {"wpe.weight"} and fresh_opt.lr == 5e-4  # hyperparameters stay the caller's
    assert fresh_opt.step_count == opt.step_count
    for n, a in model.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[n], a)
    for n, a in opt.state_dict()["v"].items():
        np.testing.assert_array_equal(fresh_opt.state_dict()["v"][n], a)

    # A new model gets the frozen set back, so its new optimizer has the same tensors.
    m3, o3, _ = load_checkpoint(tmp_path / "ck.h5")
    assert m3.frozen == {"wpe.weight"} and set(o3.m) == set(opt.m)


def test_model_only_checkpoint_and_other_dtype(tmp_path):
    model, _ = trained()
    save_checkpoint(tmp_path / "ck.h5", model)
    m2, o2, st = load_checkpoint(tmp_path / "ck.h5", dtype="float64")
    assert o2 is None and st == {} and m2.dtype == "float64"
    np.testing.assert_array_equal(m2.state_dict()["wte.weight"], model.state_dict()["wte.weight"].astype(np.float64))
    _, opt = trained()
    save_checkpoint(tmp_path / "with_opt.h5", opt.model, opt)
    assert load_checkpoint(tmp_path / "with_opt.h5", load_optimizer=False)[1] is None
    with pytest.raises(MinisftError, match="holds no optimizer state"):
        m = GPT(CFG)
        load_checkpoint(tmp_path / "ck.h5", model=m, optimizer=AdamW(m))


def test_file_layout_and_attributes(tmp_path):
    model, opt = trained()
    save_checkpoint(tmp_path / "ck.h5", model, opt, {"step": 3})
    with h5py.File(tmp_path / "ck.h5", "r") as f:
        assert f.attrs["format"] == "minisft-checkpoint" and f.attrs["format_version"] == 1
        assert f.attrs["minisft_version"] == __version__ and f.attrs["complete"]
        assert f.attrs["dtype"] == "float32" and f.attrs["array_dtype"] == "<f4"
        assert json.loads(f["config"].asstr()[()]) == CFG.to_dict()
        assert set(f["params"]) == set(model.params) == set(f["adam/m"]) == set(f["adam/v"])
        assert f["adam"].attrs["step"] == 3 and f["params/h.1.mlp.c_fc.weight"].shape == (16, 64)


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = trained()
    path = save_checkpoint(tmp_path / "ck.h5", model, opt, {"step": 3})
    before = path.read_bytes()
    train(model, opt, 1, start=3)

    calls = []

    def failing_to_numpy(a):
        calls.append(1)
        if len(calls) == 5:
            raise MemoryError("out of memory mid-save")
        return np.array(a)
    monkeypatch.setattr(model.B, "to_numpy", failing_to_numpy)
    with pytest.raises(MemoryError):
        save_checkpoint(path, model, opt, {"step": 4})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ck.h5"]
    monkeypatch.undo()

    with pytest.raises(ValueError, match="train_state is not JSON-serialisable"):
        save_checkpoint(path, model, opt, {"step": 4, "seen": {1, 2}})
    assert path.read_bytes() == before


def test_truncated_checkpoint_is_refused(tmp_path):
    model, opt = trained()
    path = save_checkpoint(tmp_path / "ck.h5", model, opt, {"step": 3})
    raw = path.read_bytes()
    for keep in (len(raw) // 2, len(raw) - 100, 1000):
        cut = tmp_path / f"cut{keep}.h5"
        cut.write_bytes(raw[:keep])
        with pytest.raises(MinisftError, match=f"{cut}: .*(truncated|damaged)"):
            load_checkpoint(cut)


def test_incomplete_and_foreign_files_are_refused(tmp_path):
    model, _ = trained()
    path = save_checkpoint(tmp_path / "ck.h5", model)
    with h5py.File(path, "a") as f:
        del f.attrs["complete"]  # as if the writer died before its last act
    with pytest.raises(MinisftError, match="incomplete checkpoint"):
        load_checkpoint(path)

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(MinisftError, match="not a minisft checkpoint"):
        load_checkpoint(tmp_path / "other.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(MinisftError, match="cannot be read as an HDF5 checkpoint"):
        load_checkpoint(tmp_path / "text.h5")
    with pytest.raises(MinisftError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.h5")


def _tamper(path, fn):
    with h5py.File(path, "a") as f:
        fn(f)


def _replace(name, data):
    def fn(f):
        del f[name]
        f[name] = data
    return fn


TAMPERED = {
    "param shape": (_replace("params/h.0.mlp.c_fc.weight", np.ones((64, 16), np.float32)),
                    "group params/: tensor 'h.0.mlp.c_fc.weight' has shape (64, 16), the model needs (16, 64)"),
    "param dtype": (_replace("params/ln_f.bias", np.ones(16, np.float64)),
                    "dataset params/ln_f.bias is float64, expected float32"),
    "moment shape": (_replace("adam/v/wpe.weight", np.ones((31, 16), np.float32)),
                     "group adam/v/: tensor 'wpe.weight' has shape (31, 16)"),
    "missing param": (lambda f: f.__delitem__("params/ln_f.bias"), "group params/: tensor names do not match "
                                                                  "the model: missing ln_f.bias, unexpected none"),
    "extra moment": (lambda f: f.create_dataset("adam/m/extra", data=np.ones(2, np.float32)),
                     "group adam/m/: tensor names do not match the model: missing none, unexpected extra"),
    "config": (_replace("config", json.dumps({**CFG.to_dict(), "n_heads": 3})),
               "dataset 'config' is not a valid model config: GPTConfig: emb_dim 16 is not divisible"),
    "config not JSON": (_replace("config", "{oops"), "dataset 'config' is not valid JSON text"),
    "rng": (lambda f: f["model"].attrs.__setitem__("rng", json.dumps({"bit_generator": "Nope"})),
            "attributes rng/frozen of group 'model' are not valid"),
    "version": (lambda f: f.attrs.__setitem__("format_version", 7), "format version 7 is not supported"),
    "missing group": (lambda f: f.__delitem__("train_state"), "damaged checkpoint"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_checkpoints_are_refused_naming_the_dataset(tmp_path, case):
    fn, words = TAMPERED[case]
    model, opt = trained()
    path = save_checkpoint(tmp_path / "ck.h5", model, opt, {"step": 3})
    _tamper(path, fn)
    with pytest.raises(MinisftError) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and words in str(e.value)


def test_a_bad_file_leaves_the_callers_model_untouched(tmp_path):
    model, opt = trained()
    path = save_checkpoint(tmp_path / "ck.h5", model, opt)
    _tamper(path, lambda f: f.create_dataset("adam/v/extra", data=np.ones(2, np.float32)))
    target = GPT(CFG, seed=5)
    target_opt = AdamW(target)
    before = target.state_dict()
    with pytest.raises(MinisftError, match=r"adam/v/: tensor names do not match"):
        load_checkpoint(path, model=target, optimizer=target_opt)
    for n, a in before.items():  # the parameters were checked before any was replaced
        np.testing.assert_array_equal(target.state_dict()[n], a)
    assert target_opt.step_count == 0


def test_model_of_another_shape_is_refused(tmp_path):
    model, opt = trained()
    save_checkpoint(tmp_path / "ck.h5", model, opt)
    other = GPT(GPTConfig(**{**CFG.to_dict(), "n_layers": 3, "tie_embeddings": True}))
    with pytest.raises(MinisftError, match="does not match this one \\(n_layers: file 2, model 3; "
                                           "tie_embeddings: file False, model True\\)"):
        load_checkpoint(tmp_path / "ck.h5", model=other)
    # Dropout is a setting of the run, not of the parameters: a model without it still loads.
    plain = GPT(GPTConfig(**{**CFG.to_dict(), "drop_rate": 0.0}))
    load_checkpoint(tmp_path / "ck.h5", model=plain, load_optimizer=False)
    np.testing.assert_array_equal(plain.state_dict()["wte.weight"], model.state_dict()["wte.weight"])
    # An optimizer built for a different set of tensors cannot take the state.
    frozen = GPT(CFG)
    frozen.frozen = {"wte.weight"}
    with pytest.raises(MinisftError, match="optimizer state does not fit"):
        load_checkpoint(tmp_path / "ck.h5", model=frozen, optimizer=AdamW(frozen))


def test_a_saved_rng_continues_exactly_where_it_stopped_even_through_json():
    g = np.random.default_rng(3)
    g.normal(size=3)
    state = json.loads(json.dumps(rng_state(g)))
    np.testing.assert_array_equal(rng_from_state(state).normal(size=5), g.normal(size=5))
    with pytest.raises(ValueError, match="not a PCG64 state"):
        rng_from_state({"bit_generator": "MT19937"})
