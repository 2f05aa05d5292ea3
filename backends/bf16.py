"""bfloat16 GEMMs for the numba backend without torch: oneDNN's dnnl_gemm_bf16bf16f32 through ctypes.

bfloat16 is the top half of a float32 (sign, 8 exponent bits, 7 mantissa bits), so an array of them
is a uint16 array here: `to_bf16` rounds float32 to nearest-even into those bits, and `gemm`
multiplies two such arrays into a float32 result, with float32 accumulation (the library's
contract). On a CPU with AVX512_BF16 (VDPBF16PS: 32 bf16 products per instruction, twice float32's
16 FMAs) or AMX-BF16 tiles this runs 2-4x faster than float32 sgemm.

Why oneDNN (pip extra minisft[bf16]: the `onednn-cpu-gomp` wheel, 39 MB, the library and nothing else,
threaded by the system's GNU OpenMP): measured here (BENCHMARKS.md) on the step's shapes it ran at
2-4x numpy's float32 sgemm, where oneMKL's cblas_gemm_bf16bf16f32 (the `mkl` wheel, 229 MB) ran
slower than float32: on this AMD EPYC MKL takes no AVX512_BF16 code path, oneDNN picks its kernels
from the CPU's feature bits whatever the vendor. dnnl_gemm_bf16bf16f32 is row-major and exported
beside the documented dnnl_sgemm with the same argument order.

Nothing here runs at import: `problem()` says why bf16 cannot run (CPU, library), `gemm` loads the
library on first use.
"""
import ctypes
import ctypes.util
import functools
import os
import sys
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of the bf16 dot-product units
INSTALL = "pip install 'minisft[bf16]' (the onednn-cpu-gomp wheel)"
ENV_LIB = "MINISFT_DNNL"                 # a libdnnl.so to use instead of the one found


def cpu_bf16_flags() -> list:
    """Which of CPU_FLAGS this CPU reports (Linux: /proc/cpuinfo; elsewhere none are known)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    flags = set(line.split(":", 1)[-1].split())
    return [f for f in CPU_FLAGS if f in flags]


def _candidates() -> list:
    if os.environ.get(ENV_LIB):
        return [os.environ[ENV_LIB]]
    here = [str(Path(sys.prefix) / "lib" / name) for name in ("libdnnl.so.3", "libdnnl.so")]  # the wheel's data dir
    found = ctypes.util.find_library("dnnl")
    return [p for p in here if Path(p).exists()] + ([found] if found else [])


@functools.cache
def _lib():
    """The loaded library with gemm's signature set, or the reason it cannot be loaded (a str)."""
    paths = _candidates()
    if not paths:
        return f"oneDNN (libdnnl) is not installed: {INSTALL}"
    # GNU OpenMP threads spin after each parallel region by default, taking the cores the numba
    # kernel that comes next needs; passive threads sleep at once. Read when libgomp loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        lib = ctypes.CDLL(paths[0])
        fn = lib.dnnl_gemm_bf16bf16f32
    except (OSError, AttributeError) as e:
        return f"oneDNN at {paths[0]} cannot be used ({e}): {INSTALL}"
    i64, ptr, f32, ch = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_char
    fn.argtypes = [ch, ch, i64, i64, i64, f32, ptr, i64, ptr, i64, f32, ptr, i64]
    fn.restype = ctypes.c_int
    return lib


@functools.cache
def problem() -> str | None:
    """None when bfloat16 GEMMs can run here, else one line saying what is missing."""
    flags = cpu_bf16_flags()
    if not flags:
        return (f"this CPU has no bfloat16 units (none of {', '.join(CPU_FLAGS)} in /proc/cpuinfo): "
                f"use dtype float32")
    lib = _lib()
    return lib if isinstance(lib, str) else None


def _operand(x):
    """A 2-D bf16 operand as (transpose flag, leading dimension): row-major, or the transpose of one."""
    if x.dtype != np.uint16 or x.ndim != 2:
        raise ValueError(f"bf16 gemm: operands are 2-D uint16 bf16 bits, got {x.dtype} of shape {x.shape}")
    if x.flags.c_contiguous:
        return b"N", x.shape[1]
    if x.T.flags.c_contiguous:
        return b"T", x.shape[0]
    raise ValueError(f"bf16 gemm: an operand must be contiguous or a transposed contiguous array, strides {x.strides}")


def gemm(a, b, out, beta: float = 0.0) -> None:
    """out = a @ b + beta * out, numpy semantics: a (M, K) and b (K, N) bf16 bits, either may be the
    .T view of a contiguous array; out (M, N) C-contiguous float32, written in place."""
    lib = _lib()
    if isinstance(lib, str):
        raise RuntimeError(lib)
    (M, K), (K2, N) = a.shape, b.shape
    if K != K2 or out.shape != (M, N) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"bf16 gemm: {a.shape} @ {b.shape} into {out.dtype} {out.shape}")
    (ta, lda), (tb, ldb) = _operand(a), _operand(b)
    status = lib.dnnl_gemm_bf16bf16f32(ta, tb, M, N, K, 1.0, a.ctypes.data, lda, b.ctypes.data, ldb,
                                       beta, out.ctypes.data, N)
    if status != 0:
        raise RuntimeError(f"dnnl_gemm_bf16bf16f32 failed with status {status} on {a.shape} @ {b.shape}")


# ---- float32 <-> bfloat16 bits ------------------------------------------------------------------
@intrinsic
def _f32_bits(typingctx, x):
    """The bit pattern of a float32, as a uint32."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(x), codegen


@njit(inline="always", cache=True)
def bf16_round(x):
    """float32 -> bf16 bits (uint16), round to nearest, ties to even: add 0x7FFF plus the lowest kept
    bit, keep the top 16 bits. A NaN stays a (quiet) NaN: rounding its payload could carry it into
    infinity. For use inside numba kernels (the AdamW pass and the head write bf16 copies with it)."""
    u = _f32_bits(x)
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((u >> np.uint32(16)) | np.uint32(0x40))
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(parallel=True, cache=True, nogil=True)
def _to_bf16(x, out):
    for i in prange(x.shape[0]):
        out[i] = bf16_round(x[i])


def to_bf16(x, out=None):
    """float32 array -> its bf16 bits (uint16, same shape), rounded to nearest-even."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if out is None:
        out = np.empty(x.shape, dtype=np.uint16)
    _to_bf16(x.reshape(-1), out.reshape(-1))
    return out


def from_bf16(bits):
    """bf16 bits (uint16) -> float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)
