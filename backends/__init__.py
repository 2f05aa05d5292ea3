"""Backends: one kernel interface (interface.py), implemented by numpy (the reference), numba and torch.

`get_backend(name, dtype, device)` is the registry. Implementations are imported only when asked
for, so `import minisft` never imports torch (or compiles numba kernels).
"""

import importlib.util

BACKENDS = ("numpy", "numba", "torch")
AUTO = "auto"  # every command's default backend (see resolve), and finetune's default dtype (resolve_dtype)


def resolve(name: str, device: str | None = None) -> tuple[str, str | None]:
    """(backend, device) for a backend name that may be "auto": torch on the GPU where PyTorch is
    installed with CUDA (or a GPU device is asked for), else numba, the fast CPU backend. torch is
    imported only to ask whether CUDA is there."""
    if name != AUTO:
        return name, device
    if device not in (None, "cpu"):
        return "torch", device
    if device is None and importlib.util.find_spec("torch") is not None:
        import torch
        if torch.cuda.is_available():
            return "torch", "cuda"
    return "numba", device


def resolve_dtype(dtype: str, name: str) -> str:
    """The dtype for "auto" on a resolved backend name: bfloat16 on numba where this CPU has bf16 units
    and oneDNN is installed (its loss agrees with float32's within 0.5% over 50 steps of the book's
    recipe: BENCHMARKS.md, tests/test_numba_bf16.py), else float32. Any other dtype is kept."""
    if dtype != AUTO:
        return dtype
    if name == "numba":
        from . import bf16
        return "bfloat16" if bf16.problem() is None else "float32"
    return "float32"


def dtype_problem(dtype: str, name: str) -> str | None:
    """Why a resolved backend cannot run dtype here (one line), or None: the numba backend's bfloat16
    needs the CPU's bf16 units and oneDNN (backends/bf16.py)."""
    if dtype == "bfloat16" and name == "numba":
        from . import bf16
        return bf16.problem()
    return None


def dtype_warning(dtype: str, name: str, device: str | None) -> str | None:
    """Why dtype would run slowly here (one line), or None: torch runs CPU bfloat16 on a CPU without
    bf16 units in emulation (4.9 s a gpt2-tiny step on one such CPU, issue 26). Said only where
    /proc/cpuinfo lists the CPU's features, so that their absence is known."""
    if dtype != "bfloat16" or name != "torch" or device not in (None, "cpu"):
        return None
    from . import bf16
    if not bf16.cpuinfo("flags") or bf16.cpu_bf16_flags():
        return None
    return (f"torch emulates bfloat16 on this CPU (none of {', '.join(bf16.CPU_FLAGS)} in /proc/cpuinfo): many "
            f"times slower than --dtype float32")


def get_backend(name: str = "numpy", dtype: str = "float32", device: str | None = None):
    """Resolve a backend by name: "numpy", "numba", "torch" (device "cpu", "cuda", "mps") or "auto";
    dtype "float32", "float64", "bfloat16" or "auto" (resolve_dtype)."""
    name, device = resolve(name, device)
    dtype = resolve_dtype(dtype, name)
    if name == "numpy" or name == "numba":
        if device not in (None, "cpu"):
            raise ValueError(f"the {name} backend runs on the CPU only, not on device {device!r}")
    if name == "numpy":
        from .numpy_backend import NumpyBackend
        return NumpyBackend(dtype)
    if name == "numba":
        from .numba_backend import NumbaBackend
        return NumbaBackend(dtype)
    if name == "torch":
        from .torch_backend import TorchBackend
        return TorchBackend(dtype, device or "cpu")
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
