"""--backend auto, every command's default: torch on a CUDA GPU, else the numba backend; and --dtype auto,
finetune's: bfloat16 on numba where the CPU and oneDNN run bf16 GEMMs, else float32."""
import functools
import importlib.util

import pytest

from minisft import GPT, GPTConfig
from minisft.backends import bf16, dtype_warning, get_backend, resolve, resolve_dtype
from minisft.cli import main
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


@pytest.fixture
def no_bf16_units(monkeypatch):
    """This machine seen as a CPU without bf16 units (problem() is cached: a fresh cache over the patch)."""
    monkeypatch.setattr(bf16, "cpu_bf16_flags", list)
    monkeypatch.setattr(bf16, "problem", functools.cache(bf16.problem.__wrapped__))


def test_bfloat16_on_numba_without_bf16_units_is_one_line_exit_2_in_every_command(no_bf16_units, tmp_path, capsys,
                                                                                   book_data):
    GPT(GPTConfig.preset("gpt2-tiny")).save_pretrained(tmp_path / "w")
    run = ["--model", "gpt2-tiny", "--init", "random", "--data", str(book_data), "--out", str(tmp_path / "run"),
           "--backend", "numba", "--dtype", "bfloat16"]
    commands = [["finetune", *run], ["finetune", "--dry-run", *run],
                ["generate", "--weights", str(tmp_path / "w"), "--backend", "numba", "--dtype", "bfloat16",
                 "--data", str(book_data), "--out", str(tmp_path / "r.json")],
                ["bench", "--backend", "numba-bf16"]]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith("minisft: error: ") and "no bfloat16 units" in err, argv
    assert not (tmp_path / "run").exists() and not (tmp_path / "r.json").exists()  # refused before any work


def test_torch_cpu_bfloat16_without_bf16_units_is_warned_about_and_never_auto(no_bf16_units, tmp_path, capsys,
                                                                              book_data):
    assert resolve_dtype("auto", "torch") == "float32" and resolve_dtype("auto", "numba") == "float32"
    assert dtype_warning("bfloat16", "torch", "cuda") is None and dtype_warning("float32", "torch", None) is None
    assert main(["finetune", "--dry-run", "--model", "gpt2-tiny", "--init", "random", "--data", str(book_data),
                 "--backend", "torch",
                 "--device", "cpu", "--dtype", "bfloat16"]) == 0
    warnings = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warning: ")]
    assert warnings == [("warning: torch emulates bfloat16 on this CPU (none of avx512_bf16, amx_bf16 in "
                         "/proc/cpuinfo): many times slower than --dtype float32")]
