"""--backend auto, every command's default: torch on a CUDA GPU, else the numba backend."""
import importlib.util

import pytest

from minisft.backends import get_backend, resolve
from minisft.settings import Settings

HAS_CUDA = importlib.util.find_spec("torch") is not None and __import__("torch").cuda.is_available()


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available here: auto picks torch")
def test_auto_picks_numba_on_a_machine_without_cuda():
    assert resolve("auto") == ("numba", None) and resolve("auto", "cpu") == ("numba", "cpu")
    assert get_backend("auto", "float32").name == "numba"


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA here")
def test_auto_picks_torch_on_cuda():
    assert resolve("auto") == ("torch", "cuda")


def test_auto_with_a_gpu_device_is_torch_and_named_backends_are_kept():
    assert resolve("auto", "mps") == ("torch", "mps")
    assert resolve("numpy") == ("numpy", None) and resolve("torch", "cpu") == ("torch", "cpu")


def test_finetune_defaults_to_auto():
    assert Settings().backend == "auto"
