"""Which backends these tests can run here, and the tolerance helpers they share."""
import importlib.util

import numpy as np
import pytest

from minisft.backends import get_backend

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
