"""bfloat16 GEMMs for the numba backend without torch: oneDNN's matmul primitive through ctypes.

bfloat16 is the top half of a float32 (sign, 8 exponent bits, 7 mantissa bits), so an array of them
is a uint16 array here: `to_bf16` rounds float32 to nearest-even into those bits, and `gemm`
multiplies two such arrays into a float32 result, with float32 accumulation (the library's
contract). On a CPU with AVX512_BF16 (VDPBF16PS: 32 bf16 products per instruction, twice float32's
16 FMAs) or AMX-BF16 tiles this runs 2-8x faster than float32 sgemm.

Why oneDNN (pip extra minisft[bf16]: the `onednn-cpu-gomp` wheel, 39 MB, the library and nothing else,
threaded by the system's GNU OpenMP): measured here (BENCHMARKS.md) on the step's shapes it ran at
2-4x numpy's float32 sgemm, where oneMKL's cblas_gemm_bf16bf16f32 (the `mkl` wheel, 229 MB) ran
slower than float32: on an AMD EPYC MKL takes no AVX512_BF16 code path, oneDNN picks its kernels
from the CPU's feature bits whatever the vendor.

Why the matmul primitive, not oneDNN's one-call dnnl_gemm_bf16bf16f32: the primitive runs the
brgemm kernels (AMX tiles where the CPU has them), the gemm call an older path. Measured on a
Sapphire Rapids-class Xeon, one thread, the step's shapes: 1.1-1.5 TFLOP/s against 0.5-1.4, and 2x
on the weight gradients (x.T @ dy, a transposed left operand). A primitive is built once per shape,
layout, beta and thread count (1-3 ms, JIT code included) and kept in a bounded cache.

Nothing here runs at import: `problem()` says why bf16 cannot run (CPU, library), `gemm` loads the
library on first use.
"""
import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys
import threading
from pathlib import Path

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from . import threads  # noqa: F401 (the pool to_bf16 and the GEMMs share, set before either runs)

CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of the bf16 dot-product units
INSTALL = "pip install 'minisft[bf16]' (the onednn-cpu-gomp wheel)"
ENV_LIB = "MINISFT_DNNL"                 # a libdnnl.so to use instead of the one found


def cpuinfo(field: str) -> str:
    """The first CPU's value of a /proc/cpuinfo field ("flags", "model name"); "" where unknown (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    line = next((ln for ln in text.splitlines() if ln.split(":", 1)[0].strip() == field), "")
    return line.split(":", 1)[-1].strip()


def cpu_bf16_flags() -> list:
    """Which of CPU_FLAGS this CPU reports (Linux: /proc/cpuinfo; elsewhere none are known)."""
    flags = set(cpuinfo("flags").split())
    return [f for f in CPU_FLAGS if f in flags]


def _candidates() -> list:
    if os.environ.get(ENV_LIB):
        return [os.environ[ENV_LIB]]
    here = [str(Path(sys.prefix) / "lib" / name) for name in ("libdnnl.so.3", "libdnnl.so")]  # the wheel's data dir
    found = ctypes.util.find_library("dnnl")
    return [p for p in here if Path(p).exists()] + ([found] if found else [])


# The few oneDNN C API values used here (oneapi/dnnl/dnnl_types.h, stable across oneDNN 3.x).
DNNL_CPU, DNNL_STREAM_IN_ORDER = 1, 1           # dnnl_engine_kind_t, dnnl_stream_flags_t
DNNL_BF16, DNNL_F32 = 2, 3                      # dnnl_data_type_t
ARG_SRC, ARG_DST, ARG_WEIGHTS = 1, 17, 33       # DNNL_ARG_*
DIMS = ctypes.c_int64 * 12                      # dnnl_dims_t (DNNL_MAX_NDIMS = 12)
CACHE_SHAPES = 256                              # primitives kept: ~16 per distinct token count in a step


class _ExecArg(ctypes.Structure):               # dnnl_exec_arg_t
    _fields_ = [("arg", ctypes.c_int), ("memory", ctypes.c_void_p)]


def _check(status, what):
    if status != 0:
        raise RuntimeError(f"oneDNN {what} failed with status {status}")


class _Dnnl:
    """The loaded library with one CPU engine and stream."""

    def __init__(self, lib):
        self.lib = lib
        # libgomp's, found through libdnnl's own dependencies: the runtime its threads come from
        self.omp_get, self.omp_set = (getattr(lib, f"omp_{op}_threads", None) for op in ("get_max", "set_num"))
        self.engine, self.stream = ctypes.c_void_p(), ctypes.c_void_p()
        _check(lib.dnnl_engine_create(ctypes.byref(self.engine), DNNL_CPU, ctypes.c_size_t(0)), "engine_create")
        _check(lib.dnnl_stream_create(ctypes.byref(self.stream), self.engine, ctypes.c_uint(DNNL_STREAM_IN_ORDER)),
               "stream_create")
        self.lock = threading.Lock()  # set_data_handle + execute on shared memory objects: one call at a time

    @contextlib.contextmanager
    def on_threads(self, n):
        """oneDNN splits a GEMM for OpenMP's thread count when the primitive is built (omp_get_max_threads),
        a count anyone in the process may change: torch.set_num_threads sets it in the same libgomp.
        Set it to n for the call and give the caller's back, so a GEMM runs on the numba kernels'
        threads, and splits its work the same way, in any process."""
        if self.omp_set is None:  # a libdnnl on another threading runtime
            yield
            return
        before = self.omp_get()
        self.omp_set(n)
        try:
            yield
        finally:
            self.omp_set(before)

    def desc(self, shape, strides, dtype):
        md = ctypes.c_void_p()
        _check(self.lib.dnnl_memory_desc_create_with_strides(ctypes.byref(md), 2, DIMS(*shape), dtype, DIMS(*strides)),
               "memory_desc_create_with_strides")
        return md


class _Matmul:
    """One matmul primitive, dst (M, N) f32 = src (M, K) bf16 @ weights (K, N) bf16 [+ beta * dst],
    for fixed shapes and element strides, with its three memory objects (their data pointers are set
    per call)."""

    def __init__(self, dn, a_shape, a_strides, b_shape, b_strides, c_shape, beta, nthreads):
        self.dn, self.nthreads, lib = dn, nthreads, dn.lib
        descs = [dn.desc(a_shape, a_strides, DNNL_BF16), dn.desc(b_shape, b_strides, DNNL_BF16),
                 dn.desc(c_shape, (c_shape[1], 1), DNNL_F32)]
        attr, post_ops, pd = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        _check(lib.dnnl_primitive_attr_create(ctypes.byref(attr)), "primitive_attr_create")
        if beta:  # dst = a @ b + beta * dst: the "sum" post-op
            _check(lib.dnnl_post_ops_create(ctypes.byref(post_ops)), "post_ops_create")
            _check(lib.dnnl_post_ops_append_sum(post_ops, ctypes.c_float(beta), ctypes.c_int32(0), 0), "append_sum")
            _check(lib.dnnl_primitive_attr_set_post_ops(attr, post_ops), "set_post_ops")
        self.prim = ctypes.c_void_p()
        with dn.on_threads(nthreads):  # the work split is fixed here, for this many threads
            _check(lib.dnnl_matmul_primitive_desc_create(ctypes.byref(pd), dn.engine, descs[0], descs[1], None,
                                                         descs[2], attr), "matmul_primitive_desc_create")
            _check(lib.dnnl_primitive_create(ctypes.byref(self.prim), pd), "primitive_create")
        self.mems = []
        for md in descs:
            mem = ctypes.c_void_p()
            _check(lib.dnnl_memory_create(ctypes.byref(mem), md, dn.engine, None), "memory_create")
            self.mems.append(mem)
        self.args = (_ExecArg * 3)(*(_ExecArg(k, m) for k, m in zip((ARG_SRC, ARG_WEIGHTS, ARG_DST), self.mems)))
        lib.dnnl_primitive_desc_destroy(pd)  # the primitive keeps what it needs
        lib.dnnl_primitive_attr_destroy(attr)
        if post_ops:
            lib.dnnl_post_ops_destroy(post_ops)
        for md in descs:
            lib.dnnl_memory_desc_destroy(md)

    def __call__(self, a, b, out):
        lib = self.dn.lib
        with self.dn.lock, self.dn.on_threads(self.nthreads):
            for mem, x in zip(self.mems, (a, b, out)):
                _check(lib.dnnl_memory_set_data_handle(mem, ctypes.c_void_p(x.ctypes.data)), "set_data_handle")
            _check(lib.dnnl_primitive_execute(self.prim, self.dn.stream, 3, self.args), "primitive_execute")
            _check(lib.dnnl_stream_wait(self.dn.stream), "stream_wait")

    def __del__(self):
        for mem in self.mems:
            self.dn.lib.dnnl_memory_destroy(mem)
        self.dn.lib.dnnl_primitive_destroy(self.prim)


@functools.cache
def _lib():
    """The loaded library (a _Dnnl), or the reason it cannot be used (a str)."""
    paths = _candidates()
    if not paths:
        return f"oneDNN (libdnnl) is not installed: {INSTALL}"
    # The library runs on GNU OpenMP's threads, shared with numba's kernels: how long they spin is
    # set in backends/threads.py, imported above, before libgomp loads.
    try:
        lib = ctypes.CDLL(paths[0])
        lib.dnnl_matmul_primitive_desc_create  # noqa: B018 (raises AttributeError if absent: oneDNN < 3.0)
        return _Dnnl(lib)
    except (OSError, AttributeError, RuntimeError) as e:
        return f"oneDNN at {paths[0]} cannot be used ({e}): {INSTALL}"


@functools.cache
def problem() -> str | None:
    """None when bfloat16 GEMMs can run here, else one line saying what is missing."""
    flags = cpu_bf16_flags()
    if not flags:
        return (f"this CPU has no bfloat16 units (none of {', '.join(CPU_FLAGS)} in /proc/cpuinfo): "
                f"use dtype float32")
    lib = _lib()
    return lib if isinstance(lib, str) else None


def _strides(x):
    """A 2-D bf16 operand's element strides: row-major, or the transpose of a row-major array."""
    if x.dtype != np.uint16 or x.ndim != 2:
        raise ValueError(f"bf16 gemm: operands are 2-D uint16 bf16 bits, got {x.dtype} of shape {x.shape}")
    if x.flags.c_contiguous:
        return (x.shape[1], 1)
    if x.T.flags.c_contiguous:
        return (1, x.shape[0])
    raise ValueError(f"bf16 gemm: an operand must be contiguous or a transposed contiguous array, strides {x.strides}")


@functools.lru_cache(maxsize=CACHE_SHAPES)
def _matmul(a_shape, a_strides, b_shape, b_strides, c_shape, beta, nthreads):
    return _Matmul(_lib(), a_shape, a_strides, b_shape, b_strides, c_shape, beta, nthreads)


def gemm(a, b, out, beta: float = 0.0) -> None:
    """out = a @ b + beta * out, numpy semantics: a (M, K) and b (K, N) bf16 bits, either may be the
    .T view of a contiguous array; out (M, N) C-contiguous float32, written in place."""
    dn = _lib()
    if isinstance(dn, str):
        raise RuntimeError(dn)
    (M, K), (K2, N) = a.shape, b.shape
    if K != K2 or out.shape != (M, N) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"bf16 gemm: {a.shape} @ {b.shape} into {out.dtype} {out.shape}")
    _matmul(a.shape, _strides(a), b.shape, _strides(b), out.shape, float(beta), numba.get_num_threads())(a, b, out)


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
