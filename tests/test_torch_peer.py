"""The hand-written engine against a PyTorch-autograd GPT-2 (minisft/peer.py), weights copied by
HF name, on a batch built like the book's collate (pad 50256, -100 after the first end-of-text).

Tolerances (float32): logits and loss <= 1e-5 relative, every gradient <= 1e-4 norm-relative.
AdamW: 20 steps equal torch.optim.AdamW step for step (float64 <= 1e-12, float32 <= 1e-6).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the autograd peer needs it "
                                           "(pip install 'minisft[torch]')")

from minisft import GPT, AdamW, GPTConfig, clip_grad_norm  # noqa: E402
from minisft.batch import IGNORE_INDEX  # noqa: E402
from tests.helpers import ALL_BACKENDS, backend_or_skip, rel_err  # noqa: E402
from tests.helpers import book_like_batch  # noqa: E402
from minisft.peer import TorchGPT  # noqa: E402

EOT = 50256
# The real GPT-2 vocabulary (so 50256 pads), a small body.
CFG = dict(vocab_size=50257, context_length=32, emb_dim=32, n_layers=2, n_heads=4)


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    backend_or_skip(request.param, "float32")
    return request.param


@pytest.mark.parametrize("tie", [False, True])
def test_logits_loss_and_gradients_match_pytorch_autograd(backend, tie):
    cfg = GPTConfig(**CFG, tie_embeddings=tie)
    model = GPT(cfg, backend=backend, dtype="float32", seed=0)
    rng = np.random.default_rng(0)
    sd = {n: (a + rng.normal(0, 0.05, a.shape)).astype(np.float32) for n, a in model.state_dict().items()}
    model.load_state_dict(sd)
    inputs, targets = book_like_batch(rng, cfg.vocab_size, [12, 5, 20, 9], pad=EOT)
    assert (inputs == EOT).any() and (targets == IGNORE_INDEX).any() and (targets == EOT).sum() == 4

    peer = TorchGPT(cfg)
    peer.load_numpy(sd)
    x, y = torch.from_numpy(inputs), torch.from_numpy(targets)
    peer_logits = peer(x)
    peer_loss = peer.loss(x, y)
    peer_loss.backward()

    assert rel_err(model.logits(inputs), peer_logits.detach().numpy()) <= 1e-5
    loss, grads = model.loss_and_grad(inputs, targets)
    assert abs(loss - peer_loss.item()) <= 1e-5 * peer_loss.item()
    peer_grads = peer.grads_numpy()
    assert set(grads) == set(peer_grads)
    for name, g in grads.items():
        assert rel_err(g, peer_grads[name]) <= 1e-4, name


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-6)])
@pytest.mark.parametrize("decay", ["all", "matrices"])
def test_adamw_matches_torch_step_for_step(backend, dtype, tol, decay):
    backend_or_skip(backend, dtype)
    cfg = GPTConfig(vocab_size=50, context_length=8, emb_dim=8, n_layers=1, n_heads=2)
    model = GPT(cfg, backend=backend, dtype=dtype, seed=0)
    opt = AdamW(model, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, decay=decay)
    tdt = torch.float64 if dtype == "float64" else torch.float32
    tparams = {n: torch.tensor(a, dtype=tdt, requires_grad=True) for n, a in model.state_dict().items()}
    embeddings = ("wte.weight", "wpe.weight")
    decayed = [p for n, p in tparams.items() if decay == "all" or (p.ndim == 2 and n not in embeddings)]
    rest = [p for p in tparams.values() if all(p is not q for q in decayed)]
    topt = torch.optim.AdamW([{"params": decayed, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    rng = np.random.default_rng(1)
    for step in range(20):
        grads = {n: rng.normal(size=a.shape).astype(dtype) for n, a in tparams.items()}
        for n, p in tparams.items():
            p.grad = torch.from_numpy(grads[n]).to(tdt)
        topt.step()
        opt.step(grads)
        ours = model.state_dict()
        for n, p in tparams.items():
            assert rel_err(ours[n], p.detach().numpy()) <= tol, f"step {step + 1}: {n}"


def test_clip_grad_norm_matches_torch(backend):
    cfg = GPTConfig(vocab_size=50, context_length=8, emb_dim=8, n_layers=1, n_heads=2)
    model = GPT(cfg, backend=backend, dtype="float32", seed=0)
    rng = np.random.default_rng(2)
    inputs, targets = book_like_batch(rng, cfg.vocab_size, [5, 7])
    _, grads = model.loss_and_grad(inputs, targets)
    tgrads = [torch.from_numpy(g.copy()) for g in grads.values()]
    # torch clips parameters' .grad: give each parameter its gradient, then compare
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in tgrads]
    for p, g in zip(params, tgrads):
        p.grad = g
    tnorm = torch.nn.utils.clip_grad_norm_(params, max_norm=0.1)
    norm = clip_grad_norm(model, max_norm=0.1)
    assert abs(norm - tnorm.item()) <= 1e-6 * tnorm.item()
    for n, p in zip(grads, params):
        assert rel_err(model.B.to_numpy(model.grads[n]), p.grad.numpy()) <= 1e-6, n
    clipped = np.sqrt(sum(float((model.B.to_numpy(g).astype(np.float64) ** 2).sum()) for g in model.grads.values()))
    assert abs(clipped - 0.1) <= 1e-5
