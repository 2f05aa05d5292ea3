"""--backend auto, every command's default: torch on a CUDA GPU, else the numba backend; and --dtype auto,
finetune's: bfloat16 on numba where the CPU and oneDNN run bf16 GEMMs, else float32."""
import importlib.util

import pytest

from minisft.backends import bf16, get_backend, resolve, resolve_dtype
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


def test_finetune_defaults_to_dtype_auto():
    assert Settings().dtype == "auto"


def test_dtype_auto_is_bfloat16_on_numba_exactly_where_bf16_gemms_run_else_float32():
    assert resolve_dtype("auto", "numba") == ("float32" if bf16.problem() else "bfloat16")
    assert get_backend("numba", "auto").dtype == resolve_dtype("auto", "numba")
    assert resolve_dtype("auto", "numpy") == "float32" and resolve_dtype("auto", "torch") == "float32"
    assert resolve_dtype("float64", "numba") == "float64" and resolve_dtype("bfloat16", "torch") == "bfloat16"


def test_dtype_auto_falls_back_to_float32_when_onednn_is_missing(monkeypatch):
    monkeypatch.setattr(bf16, "problem", lambda: "oneDNN (libdnnl) is not installed")
    assert resolve_dtype("auto", "numba") == "float32" and get_backend("numba", "auto").dtype == "float32"
