"""What the tests share: the backends, tolerance helpers, and the book's own definitions (its collate's
batches, its prompt text) that the tests check minisft against."""
import importlib.util

import numpy as np
import pytest

from minisft.backends import get_backend
from minisft.batch import IGNORE_INDEX

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
