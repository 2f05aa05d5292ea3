"""The whole model: finite differences, packed == padded, state dicts, and the torch-free import."""
import subprocess
import sys

import numpy as np
import pytest

from minisft import GPT, GPTConfig, pack_padded
from minisft.batch import IGNORE_INDEX
from minisft.gradcheck import fd_error
from minisft.model import param_shapes
from tests.helpers import ALL_BACKENDS, backend_or_skip, book_like_batch, rel_err
from tests.conftest import ROOT

TINY = dict(vocab_size=31, context_length=12, emb_dim=8, n_layers=2, n_heads=2)


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    backend_or_skip(request.param, "float64")
    return request.param


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("drop_rate", [0.0, 0.2])
def test_whole_model_gradients_match_finite_differences(backend, tie, drop_rate):
    """Sampled entries of EVERY parameter tensor, float64, loss = mean over valid targets.
    With dropout the RNG is rewound before each evaluation so every one sees the same masks."""
    cfg = GPTConfig(**TINY, tie_embeddings=tie, drop_rate=drop_rate)
    model = GPT(cfg, backend=backend, dtype="float64", seed=3)
    rng = np.random.default_rng(11)
    # Biases and layernorm params start at 0/1; randomize so no gradient is structurally special.
    sd = {n: a + rng.normal(0, 0.1, a.shape) for n, a in model.state_dict().items()}
    model.load_state_dict(sd)
    inputs, targets = book_like_batch(rng, cfg.vocab_size, [7, 3, 10])
    rng_state = model.rng.bit_generator.state
    _, grads = model.loss_and_grad(inputs, targets)
    assert set(grads) == set(param_shapes(cfg))

    def loss():  # of the parameters in sd, which fd_error perturbs
        model.load_state_dict(sd)
        model.rng.bit_generator.state = rng_state
        return model.loss_and_grad(inputs, targets)[0]
    # A wide step keeps round-off (~1e-16 |f| / eps) far below the tolerance; 3 entries of every tensor,
    # each four whole-model losses.
    for name in param_shapes(cfg):
        err = fd_error(loss, sd[name], grads[name], rng, eps=1e-3, samples=3)
        assert err <= 1e-7, f"{name}: finite-difference relative error {err:.2e}"


def test_packed_layout_equals_padded_layout(backend):
    """Dropping the trailing pad positions (all -100 targets) changes neither loss nor gradients."""
    cfg = GPTConfig(**TINY)
    model = GPT(cfg, backend=backend, dtype="float64", seed=5)
    rng = np.random.default_rng(2)
    inputs, targets = book_like_batch(rng, cfg.vocab_size, [9, 2, 5, 11])
    loss_padded, g_padded = model.loss_and_grad(inputs, targets)

    packed = pack_padded(inputs, targets)
    assert packed.num_tokens < inputs.size
    model.zero_grad()
    loss_sum, n_valid = model.forward_backward(packed)
    assert n_valid == np.count_nonzero(targets != IGNORE_INDEX)
    assert abs(loss_sum / n_valid - loss_padded) <= 1e-6 * loss_padded
    for name, g in g_padded.items():
        assert rel_err(model.B.to_numpy(model.grads[name]), g) <= 1e-6, name


def test_grad_scale_accumulates_one_big_batch(backend):
    """Two micro-batches scaled by 1/(valid targets in both) sum to the gradient of one batch."""
    cfg = GPTConfig(**TINY)
    model = GPT(cfg, backend=backend, dtype="float64", seed=5)
    rng = np.random.default_rng(8)
    inputs, targets = book_like_batch(rng, cfg.vocab_size, [9, 2, 5, 11])
    loss_all, g_all = model.loss_and_grad(inputs, targets)
    parts = [pack_padded(inputs[:1], targets[:1]), pack_padded(inputs[1:], targets[1:])]
    total = sum(p.num_valid for p in parts)
    model.zero_grad()
    loss_sum = sum(model.forward_backward(p, grad_scale=1.0 / total)[0] for p in parts)
    assert abs(loss_sum / total - loss_all) <= 1e-12 * loss_all
    for name, g in g_all.items():
        assert rel_err(model.B.to_numpy(model.grads[name]), g) <= 1e-12, name


def test_frozen_weights_get_no_gradient_and_leave_the_rest_unchanged():
    cfg = GPTConfig(**TINY)
    model = GPT(cfg, dtype="float64", seed=1)
    rng = np.random.default_rng(4)
    inputs, targets = book_like_batch(rng, cfg.vocab_size, [6, 4])
    _, full = model.loss_and_grad(inputs, targets)
    model.frozen = {"h.0.mlp.c_fc.weight", "wte.weight", "lm_head.weight"}
    _, part = model.loss_and_grad(inputs, targets)
    assert set(part) == set(full) - model.frozen
    for name, g in part.items():
        np.testing.assert_allclose(g, full[name], rtol=1e-12, atol=1e-15)


def test_state_dict_round_trip_casts_and_validates():
    cfg = GPTConfig(**TINY)
    a = GPT(cfg, dtype="float64", seed=1)
    b = GPT(cfg, dtype="float32", seed=2)
    b.load_state_dict(a.state_dict())
    for n, arr in b.state_dict().items():
        assert arr.dtype == np.float32
        np.testing.assert_array_equal(arr, a.state_dict()[n].astype(np.float32))
    sd = a.state_dict()
    sd["h.1.mlp.c_fc.weight"] = sd["h.1.mlp.c_fc.weight"][:, :3]
    with pytest.raises(ValueError,
                       match=r"tensor 'h\.1\.mlp\.c_fc\.weight' has shape \(8, 3\), the model needs \(8, 32\)"):
        b.load_state_dict(sd)
    with pytest.raises(ValueError, match="missing"):
        b.load_state_dict({"wte.weight": sd["wte.weight"]})


def test_init_follows_gpt2():
    cfg = GPTConfig.preset("gpt2-tiny", n_layers=8)
    sd = GPT(cfg, seed=0).state_dict()
    assert abs(sd["wte.weight"].std() - 0.02) < 1e-3
    assert abs(sd["h.3.mlp.c_proj.weight"].std() - 0.02 / 4) < 2e-4   # 1/sqrt(2 * 8 layers)
    assert np.all(sd["h.0.ln_1.weight"] == 1) and np.all(sd["h.0.attn.c_attn.bias"] == 0)
    assert GPT(cfg, seed=0).state_dict()["wte.weight"].tobytes() == sd["wte.weight"].tobytes()


def test_presets_have_the_openai_sizes():
    expect = {"gpt2-small": 124_439_808, "gpt2-medium": 354_823_168}
    for name, n in expect.items():
        cfg = GPTConfig.preset(name, tie_embeddings=True)  # OpenAI's count shares the head with wte
        assert sum(np.prod(s) for s in param_shapes(cfg).values()) == n


def test_positions_beyond_the_context_are_refused():
    model = GPT(GPTConfig(**TINY))
    with pytest.raises(ValueError, match="exceeds the context length 12"):
        model.logits(np.zeros((1, 13), dtype=np.int64))


def test_importing_minisft_does_not_import_torch():
    code = ("import sys, minisft, minisft.cli, minisft.backends; "
            "from minisft import GPT, GPTConfig; GPT(GPTConfig(vocab_size=7, context_length=4, emb_dim=4, "
            "n_layers=1, n_heads=1)); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
