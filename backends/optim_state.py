"""AdamW's moment formats, one object per `--optim-state` setting, chosen once by name (FORMATS).

A format knows what a trained tensor's state is (its groups: m and v, and for 8-bit the blocks'
scales), how it starts, how it goes to and from the numpy arrays a checkpoint stores (exactly) and
which backend kernel updates it. minisft/optim.py holds one format per optimizer; the number
formats themselves are in backends/quant.py.
"""
import math
from abc import ABC, abstractmethod

import numpy as np

from . import quant

# The lean state's arrays as numpy holds them (the numpy backend's own arrays, and every backend's
# checkpoint form): bfloat16 moments as their uint16 bit patterns, 8-bit codes, float32 block scales.
HOST_DTYPES = {"bf16": np.dtype(np.uint16), "u8": np.dtype(np.uint8), "scale": np.dtype(np.float32)}


class Format(ABC):
    name: str
    groups: tuple         # the arrays each trained tensor keeps, in checkpoint order
    lean: bool            # held in fewer bytes than the weights: needs float32 master weights

    @abstractmethod
    def layout(self, shape, weight_dtype) -> dict:
        """{group: (shape, numpy dtype)} of one tensor's state as a checkpoint stores it."""

    @abstractmethod
    def zeros(self, B, p) -> dict:
        """{group: a backend array of zeros}: the state of a fresh tensor like p."""

    @abstractmethod
    def to_host(self, B, a) -> np.ndarray:
        """One state array as the numpy array a checkpoint stores, exactly."""

    @abstractmethod
    def from_host(self, B, a: np.ndarray):
        """to_host's inverse."""

    @abstractmethod
    def step(self, B, p, g, s: dict, lr, beta1, beta2, eps, weight_decay, step, key) -> None:
        """One AdamW update of p by g on this tensor's state s {group: array}; key numbers the tensor."""

    def nbytes(self, n: int, weight_dtype) -> int:
        """Bytes of the state of a tensor of n values."""
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.layout((n,), weight_dtype).values())


class Fp32(Format):
    """m and v like the weights (their shape and dtype: float32, or float64), updated by adamw_step."""
    name, groups, lean = "fp32", ("m", "v"), False

    def layout(self, shape, weight_dtype):
        return {k: (tuple(shape), np.dtype(weight_dtype)) for k in self.groups}

    def zeros(self, B, p):
        return {k: B.zeros_like(p) for k in self.groups}

    def to_host(self, B, a):
        return B.to_numpy(a)

    def from_host(self, B, a):
        return B.from_numpy(a)

    def step(self, B, p, g, s, lr, beta1, beta2, eps, weight_decay, step, key):
        B.adamw_step(p, g, s["m"], s["v"], lr, beta1, beta2, eps, weight_decay, step)


class Lean(Format):
    """Flat (n,) state arrays of HOST_DTYPES' kinds, converted exactly by the optim_state_* kernels."""
    lean = True

    @abstractmethod
    def arrays(self, n: int) -> dict:
        """{group: (length, kind)} for a tensor of n values."""

    def layout(self, shape, weight_dtype):
        return {k: ((size,), HOST_DTYPES[kind]) for k, (size, kind) in self.arrays(math.prod(shape)).items()}

    def zeros(self, B, p):
        return {k: B.optim_state_zeros(size, kind) for k, (size, kind) in self.arrays(math.prod(p.shape)).items()}

    def to_host(self, B, a):
        return B.optim_state_to_numpy(a)

    def from_host(self, B, a):
        return B.optim_state_from_numpy(a)


class Bf16(Lean):
    """m and v as stochastically rounded bfloat16 (4 bytes per value), updated by adamw_step_bf16."""
    name, groups = "bf16", ("m", "v")

    def arrays(self, n):
        return {"m": (n, "bf16"), "v": (n, "bf16")}

    def step(self, B, p, g, s, lr, beta1, beta2, eps, weight_decay, step, key):
        B.adamw_step_bf16(p, g, s["m"], s["v"], lr, beta1, beta2, eps, weight_decay, step, key)


class Int8(Lean):
    """8-bit codes of m and sqrt(v) with one float32 scale per block of quant.BLOCK (2 bytes per
    value + 8 per block), updated by adamw_step_8bit."""
    name, groups = "8bit", ("m", "v", "m_scale", "v_scale")

    def arrays(self, n):
        blocks = quant.n_blocks(n)
        return {"m": (n, "u8"), "v": (n, "u8"), "m_scale": (blocks, "scale"), "v_scale": (blocks, "scale")}

    def step(self, B, p, g, s, lr, beta1, beta2, eps, weight_decay, step, key):
        B.adamw_step_8bit(p, g, s["m"], s["m_scale"], s["v"], s["v_scale"],
                          lr, beta1, beta2, eps, weight_decay, step)


FORMATS = {f.name: f for f in (Fp32(), Bf16(), Int8())}
OPTIM_STATES = tuple(FORMATS)   # the setting's choices
DEFAULT = "fp32"                # the setting's default, and a checkpoint's that records none
