"""What the tests share: the backends, tolerance and finite-difference helpers, small runs and models,
and the book's own definitions (its collate's batches, its prompt text) that the tests check minisft
against."""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from minisft import GPT, GPTConfig
from minisft.backends import get_backend
from minisft.batch import IGNORE_INDEX
from minisft.gradcheck import FD_TOL, fd_error
from minisft.settings import Settings, validate
from tests.conftest import ROOT
from tests.hf_files import gpt2_state

# Every backend the project has; each test module parametrizes over this list.
ALL_BACKENDS = ["numpy", "numba", "torch"]


def backend_or_skip(name: str, dtype: str, device=None):
    """The backend, or a pytest skip that says why it cannot run here."""
    if name == "torch" and importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed (pip install 'minisft[torch]')")
    return get_backend(name, dtype, device)  # a backend module that is missing fails, never skips


def rel_err(a, b) -> float:
    """Norm-relative error ||a - b|| / ||b||, computed in float64."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# Parity with the numpy reference, by the reference's dtype (a bfloat16 backend's kernels that run in
# float32 are held to float32's tolerance).
PARITY_TOL = {"float32": 1e-5, "float64": 1e-10}


def check_parity(R, B, ref, got, what):
    """ref: the numpy reference R's output, got: backend B's; arrays or tuples of them, each of B's
    store dtype and within PARITY_TOL of ref."""
    if isinstance(ref, (tuple, list)):
        assert len(ref) == len(got), what
        for i, (r, g) in enumerate(zip(ref, got)):
            check_parity(R, B, r, g, f"{what}[{i}]")
        return
    r, g = R.to_numpy(ref), B.to_numpy(got)
    assert g.shape == r.shape, f"{what}: shape {g.shape} != {r.shape}"
    assert g.dtype == R.np_dtype, f"{what}: {B.name} returned {g.dtype}, not {R.np_dtype}"
    err = rel_err(g, r)
    assert err <= PARITY_TOL[R.dtype], f"{what}: relative error {err:.2e} > {PARITY_TOL[R.dtype]}"


def book_like_batch(rng, V, lengths, pad=None):
    """Right-padded (B, T) inputs/targets built like the book's collate: each sequence gets one
    end-of-text appended, is padded with it to the longest + 1, shifted by one; targets keep the
    first end-of-text and mark the rest -100."""
    pad = V - 1 if pad is None else pad
    T = max(lengths) + 1
    seqs = np.full((len(lengths), T), pad)
    for r, n in enumerate(lengths):
        seqs[r, :n] = rng.integers(0, pad, n)
    inputs, targets = seqs[:, :-1].copy(), seqs[:, 1:].copy()
    for r, n in enumerate(lengths):
        targets[r, n:] = IGNORE_INDEX  # position n-1 predicts the first end-of-text, kept
    return inputs, targets


def book_format_input(entry):
    text = ("Below is an instruction that describes a task. Write a response that appropriately completes "
            "the request." + "\n\n### Instruction:\n" + entry["instruction"])
    return text + ("\n\n### Input:\n" + entry["input"] if entry["input"] else "")


def book_training_text(entry):
    return book_format_input(entry) + "\n\n### Response:\n" + entry["output"]


# ---- finite differences -------------------------------------------------------------------------
def same_on_one_thread(run) -> None:
    """run() -> arrays: equal bit for bit on one numba thread and on all (no race, no order that
    depends on the thread count)."""
    import numba
    n = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run()
    finally:
        numba.set_num_threads(n)
    for a, b in zip(one, run(), strict=True):
        np.testing.assert_array_equal(a, b)


def contract(B, out, G) -> float:
    """sum(G * out): a scalar whose gradient with respect to out is G (the finite-difference checks'
    upstream gradient)."""
    return float(np.sum(B.to_numpy(out) * G))


def fd_check(f, inputs: dict, analytic: dict, rng):
    """f(**inputs) -> float. Checks each named input's analytic gradient against finite differences
    (minisft.gradcheck), perturbing sampled entries of the input in place."""
    for name, grad in analytic.items():
        err = fd_error(lambda: f(**inputs), inputs[name], grad, rng)
        assert err <= FD_TOL, f"d/d{name}: finite-difference relative error {err:.2e} > {FD_TOL}"


# ---- runs and commands ------------------------------------------------------------------------------
def settings(tmp_path, data_file, **kw):
    base = dict(model="gpt2-tiny", init="random", data=str(data_file),
                out=str(tmp_path / "run"), responses=0, eval_freq=1000, eval_iter=1, backend="numpy",
                dtype="float32")  # pinned: "auto" would differ between machines with and without bf16 units
    return validate(Settings(**{**base, **kw}))


def llama_settings(tmp_path, folder, data_file, **kw):
    """Settings of a run fine-tuning the Llama-family folder (--weights DIR, e.g. the llama_folder fixture)."""
    return settings(tmp_path, data_file, **{"model": None, "init": "pretrained", "weights": str(folder),
                                            "lr": 1e-3, **kw})


# What a step record measures about the process (peak memory), not the run: a resumed run's
# differ, so comparisons of runs leave them out.
MEASURED = ("peak_rss_mb", "cuda_peak_mb")


def read_metrics(out, measured=True):
    records = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    return records if measured else [{k: v for k, v in r.items() if k not in MEASURED} for r in records]


def interrupted_run(s, monkeypatch, at_step: int) -> None:
    """Run finetune(s) and Ctrl-C it inside optimizer step at_step (the loop sees a KeyboardInterrupt)."""
    from minisft.optim import AdamW
    from minisft.train import finetune
    real_step, calls = AdamW.step, []

    def step_then_interrupt(self, *a, **k):
        calls.append(1)
        if len(calls) == at_step:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)
    monkeypatch.setattr(AdamW, "step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        finetune(s, log=quiet)
    monkeypatch.setattr(AdamW, "step", real_step)


def quiet(*_):
    pass


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "minisft", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


# ---- a small random model for export checks --------------------------------------------------------
EXPORT_CFG = GPTConfig(vocab_size=97, context_length=32, emb_dim=16, n_layers=2, n_heads=4)


def random_model(dtype="float32", seed=0, scale=1.0, **cfg):
    """A model whose every tensor is fresh random (not the init's zeros and ones), uniform in
    [-0.1, 0.1) times scale."""
    cfg = GPTConfig(**{**EXPORT_CFG.to_dict(), **cfg})
    return GPT(cfg, dtype=dtype, params={n: a * np.float32(scale) for n, a in gpt2_state(cfg, seed=seed).items()})


def token_ids(seed=3, shape=(2, 11)):
    return np.random.default_rng(seed).integers(0, EXPORT_CFG.vocab_size, size=shape)  # (B, T)
