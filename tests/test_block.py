"""The block is written once (minisft/block.py): the engine (model.py), the study (study.py) and the
PyTorch peer (peer.py) all walk its stages. A change planted in the description changes all three,
and they still agree with each other."""
import dataclasses

import numpy as np
import pytest

from minisft import GPT, GPTConfig, block
from minisft import study as S
from minisft.model import Pass
from tests.helpers import rel_err

CFG = dict(vocab_size=23, context_length=8, emb_dim=12, n_layers=2, n_heads=3)


def no_gelu():
    """The block with the MLP's gelu taken out: c_proj reads c_fc's output straight."""
    return tuple(dataclasses.replace(st, ins=("fch",)) if st.out == "fcproj" else st
                 for st in block.BLOCK if st.op != "gelu")


def model_and_peer_gradients(seed=0, grad_checkpoint=False):
    torch = pytest.importorskip("torch")
    from minisft.peer import TorchGPT
    cfg = GPTConfig(**CFG)
    model = GPT(cfg, backend="numpy", dtype="float64", seed=seed)
    model.grad_checkpoint = grad_checkpoint
    rng = np.random.default_rng(seed)
    sd = {n: a + rng.normal(0, 0.1, a.shape) for n, a in model.state_dict().items()}
    model.load_state_dict(sd)
    inputs = rng.integers(0, cfg.vocab_size, (2, 7))
    targets = np.roll(inputs, -1, axis=1)
    targets[:, -1] = -100
    loss, grads = model.loss_and_grad(inputs, targets)
    peer = TorchGPT(cfg, dtype=torch.float64)
    peer.load_numpy(sd)
    peer_loss = peer.loss(torch.from_numpy(inputs), torch.from_numpy(targets))
    peer_loss.backward()
    return loss, grads, peer_loss.item(), peer.grads_numpy()


def test_the_study_stages_are_the_descriptions_stages_and_the_model_keeps_its_names():
    s = S.study("block")
    assert [st.out for st in s.stages] == ["h.0." + st.out for st in block.BLOCK]
    assert [(st.forward, st.backward) for st in s.stages] == [(st.forward, st.backward) for st in block.BLOCK]
    m = S.study("model")
    assert sum(st.out.startswith("h.1.") for st in m.stages) == len(block.BLOCK)
    model = GPT(GPTConfig(**CFG), dtype="float64")
    attend = lambda i, qkv: model.B.attention_forward(qkv, model.B.index(np.array([0, 3])), 3, 3)  # noqa: E731
    _, a = model._block(0, model.B.from_numpy(np.ones((3, 12))), Pass(attend, False, model.B.index(np.arange(3))))
    names = {"x"} | {st.out for st in block.BLOCK}
    assert set(a.values) <= names and set(a.saved) <= names


def test_a_change_planted_in_the_description_changes_the_model_the_study_and_the_peer(monkeypatch):
    loss, _, peer_loss, _ = model_and_peer_gradients()
    n_stages = len(block.BLOCK)
    monkeypatch.setattr(block, "BLOCK", no_gelu())
    planted, grads, peer_planted, peer_grads = model_and_peer_gradients()
    # the engine and the peer both changed, and the same way: forward and backward
    assert abs(planted - loss) > 1e-3 and abs(peer_planted - peer_loss) > 1e-3
    assert abs(planted - peer_planted) <= 1e-12 * abs(peer_planted)
    assert set(grads) == set(peer_grads)
    for name, g in grads.items():
        assert rel_err(g, peer_grads[name]) <= 1e-10, name
    # checkpointed blocks are recomputed from the description too
    _, ckpt, _, _ = model_and_peer_gradients(grad_checkpoint=True)
    for name, g in grads.items():
        assert np.array_equal(g, ckpt[name]), name
    # the study walks the planted block, stage by stage, and every check passes (autograd's too)
    s = S.study("block")
    assert [st.out for st in s.stages] == ["h.0." + st.out for st in no_gelu()]
    assert len(s.stages) == n_stages - 1 and "h.0.fch_gelu" not in s.values
    pytest.importorskip("torch")
    S.torch_gradients(s)
    assert all(c.ok for c in s.checks), [c.what for c in s.checks if not c.ok]
