"""Backends: one kernel interface (interface.py), implemented by numpy (the reference), numba and torch.

`get_backend(name, dtype, device)` is the registry. Implementations are imported only when asked
for, so `import minisft` never imports torch (or compiles numba kernels).
"""

BACKENDS = ("numpy", "numba", "torch")


def get_backend(name: str = "numpy", dtype: str = "float32", device: str | None = None):
    """Resolve a backend by name: "numpy", "numba" or "torch" (device "cpu", "cuda", "mps")."""
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
