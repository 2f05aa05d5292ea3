"""The fast CPU backend: numba kernels, parallel over rows (prange), with matmuls left to BLAS.

Same interface and the same math as `numpy_backend.NumpyBackend` (tested kernel by kernel against
it); array handling and the rarely hot kernels (dropout, head_logits) are inherited from it. What
changes is how the work is done:

- Elementwise and row-wise work is one fused parallel pass (layernorm, GELU, softmax +
  cross-entropy, AdamW) instead of numpy's chain of temporaries.
- Sums that many threads would add into the same element (layernorm and bias gradients, the
  embedding scatter) are split so that no two threads ever write one element: fixed row chunks with
  their own partial sums reduced afterwards, or a partition of the gradient's rows. Fixed chunks,
  not one per thread, so results do not depend on the thread count.
- Attention runs one (sequence, head) pair per parallel task, one query row at a time, with O(L)
  scratch; the forward keeps only each row's log-sum-exp and the backward recomputes the
  probabilities from it (flash-attention style), so no (L, L) matrix is ever held. With grouped
  key/value heads the backward's task is a (sequence, key/value head) pair looping over its group's
  query heads, so the key/value gradients they share are summed by one task, without races.
- Constants are made in the array's own dtype (`x.dtype.type(c)`): a bare float literal would
  silently promote float32 arithmetic to float64 in numba.

Kernels compile on first use for each dtype and are cached on disk (`cache=True`), so later
processes start warm.

dtype "bfloat16" is mixed precision as on the torch backend: parameters, gradients, AdamW moments,
the residual stream and every non-matmul kernel stay float32; the matmuls (linear layers and the
head) take bfloat16 operands and accumulate in float32 through oneDNN (backends/bf16.py). Each
weight's bfloat16 copy is made on its first use and rewritten by the AdamW pass that updates the
weight, in the same loop: weights must change only through adamw_step (or be new arrays, as
load_state_dict makes). Activations and gradients are rounded to bfloat16 as each matmul takes them.
"""
import math
import weakref

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from . import bf16, heap, quant, threads  # noqa: F401 (threads: the pool, set before any kernel runs)
from .constants import HEAD_CHUNK_BYTES, IGNORE_INDEX, LN_EPS
from .numpy_backend import GELU_C, NumpyBackend

# Fast-math without 'nnan'/'ninf': reassociation lets reductions vectorise, but no kernel may
# assume away infinities.
FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}
ROW_CHUNK = 32          # rows per partial sum in the column reductions (layernorm dw/db, bias grads)
EMB_TASKS = 64          # tasks in the embedding scatter (each owns the rows with index = task mod 64)

jit = dict(cache=True, nogil=True, error_model="numpy")  # numpy: no zero-division check per division


def _flat(a):
    """A 1-D view of a C-contiguous array, never a copy: in-place kernels write through it."""
    if not a.flags.c_contiguous:
        raise ValueError(f"numba backend: an in-place kernel needs a C-contiguous array, got strides {a.strides}")
    return a.reshape(-1)


# ---- exp that vectorises -------------------------------------------------------------------------
# numba calls the C library's scalar expf one element at a time, and the softmaxes and GELUs of a
# gpt2-small step take ~70M exponentials. This float32 exp is plain arithmetic that LLVM vectorises:
# 3x faster, and as accurate (max 1 ulp, the same as glibc's expf). Cephes' expf: n = round(x log2 e),
# r = x - n ln 2 in two parts (Cody-Waite), exp(r) by a degree-7 polynomial, times 2^n built in the
# exponent bits. Inputs are clamped to [-87, 88] (the normal float32 range): below -87 it returns
# exp(-87) = 1.6e-38 rather than a denormal or 0; NaN stays NaN. float64 keeps libm's exp.
@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of an integer."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32 else args[0]
        return builder.bitcast(v, ir.FloatType())
    return types.float32(bits), codegen


def _exp(x):
    """exp(x), for use inside numba kernels only."""
    return math.exp(x)


@overload(_exp)
def _exp_impl(x):
    if x != types.float32:
        return lambda x: math.exp(x)

    def exp32(x):
        x = np.float32(-87.0) if x < np.float32(-87.0) else x
        x = np.float32(88.0) if x > np.float32(88.0) else x
        n = math.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
        r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
        p = np.float32(1.9875691500e-4)
        p = p * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        p = p * (r * r) + r + np.float32(1.0)
        return p * _f32_from_bits((np.int64(n) + 127) << 23)
    return exp32


# ---- token + position embedding ------------------------------------------------------------------
@njit(parallel=True, **jit)
def _embedding_fwd(tokens, positions, wte, wpe, out):
    for n in prange(out.shape[0]):
        t, p = tokens[n], positions[n]
        for j in range(out.shape[1]):
            out[n, j] = wte[t, j] + wpe[p, j]


@njit(inline="always", **jit)
def _scatter_owned(dst, dx, n, row, k):
    """dst[row] += dx[n], a whole contiguous row, if task k owns gradient row `row`."""
    if row % EMB_TASKS == k:
        for j in range(dx.shape[1]):
            dst[row, j] += dx[n, j]


@njit(parallel=True, **jit)
def _embedding_bwd(dwte, dwpe, dx, tokens, positions):
    # Row-partitioned scatter: task k owns the gradient rows whose index is k mod EMB_TASKS and adds
    # into them in position order, so repeated tokens never race and every element is summed in
    # the same order as np.add.at sums it.
    for k in prange(EMB_TASKS):
        for n in range(dx.shape[0]):
            _scatter_owned(dwte, dx, n, tokens[n], k)
            _scatter_owned(dwpe, dx, n, positions[n], k)


# ---- token embedding alone (the Llama family) ----------------------------------------------------
@njit(parallel=True, **jit)
def _token_embedding_fwd(tokens, wte, out):
    for n in prange(out.shape[0]):
        t = tokens[n]
        for j in range(out.shape[1]):
            out[n, j] = wte[t, j]                            # (N, d) row n is wte[tokens[n]]


@njit(parallel=True, **jit)
def _token_embedding_bwd(dwte, dx, tokens):
    # forward: out[n] = wte[tokens[n]], so dwte[t] += dx[n] for every n with tokens[n] = t: the same
    # row-partitioned scatter as _embedding_bwd (no races, np.add.at's order of additions).
    for k in prange(EMB_TASKS):
        for n in range(dx.shape[0]):
            _scatter_owned(dwte, dx, n, tokens[n], k)


# ---- layernorm -----------------------------------------------------------------------------------
@njit(parallel=True, fastmath=FAST, **jit)
def _layernorm_fwd(x, w, b, out, mean, rstd):
    N, d = x.shape
    eps = x.dtype.type(LN_EPS)
    one = x.dtype.type(1.0)
    for n in prange(N):
        s = 0.0  # float64 accumulators: one row's statistics, then rounded to x's dtype
        for j in range(d):
            s += x[n, j]
        m = x.dtype.type(s / d)
        s2 = 0.0
        for j in range(d):
            c = x[n, j] - m
            s2 += c * c
        r = one / math.sqrt(x.dtype.type(s2 / d) + eps)
        mean[n], rstd[n] = m, r
        for j in range(d):
            out[n, j] = (x[n, j] - m) * r * w[j] + b[j]


@njit(parallel=True, fastmath=FAST, **jit)
def _layernorm_bwd(dout, x, w, mean, rstd, dskip, dx, dw_part, db_part):
    # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) [+ dskip], dxhat = dout * w;
    # dw, db: each chunk of ROW_CHUNK rows sums into its own row of dw_part, db_part (float64).
    # dskip None compiles a version without the add.
    N, d = x.shape
    for c in prange(dw_part.shape[0]):
        for n in range(c * ROW_CHUNK, min(N, (c + 1) * ROW_CHUNK)):
            m, r = mean[n], rstd[n]
            s1 = 0.0
            s2 = 0.0
            for j in range(d):
                xhat = (x[n, j] - m) * r
                dxhat = dout[n, j] * w[j]
                s1 += dxhat
                s2 += dxhat * xhat
                dw_part[c, j] += dout[n, j] * xhat
                db_part[c, j] += dout[n, j]
            a1 = x.dtype.type(s1 / d)
            a2 = x.dtype.type(s2 / d)
            for j in range(d):
                xhat = (x[n, j] - m) * r
                g = r * (dout[n, j] * w[j] - a1 - xhat * a2)
                dx[n, j] = g if dskip is None else dskip[n, j] + g


# ---- RMSNorm (the Llama family): a whole row, or each head vector of a fused qkv (q/k norm) ----------
# Both normalise the m values x[n, lo:lo+m] on their own; the two helpers below are that one vector's
# forward and backward, which the kernels call per row or per (row, head).
@njit(fastmath=FAST, inline="always", **jit)
def _rms_vec(x, n, lo, m, w, eps, out):
    """out[n, lo:lo+m] = x * r * w, r = 1 / sqrt(mean(x^2) + eps) -> r."""
    s2 = 0.0  # a float64 accumulator, as layernorm's statistics, then rounded to x's dtype
    for j in range(m):
        s2 += x[n, lo + j] * x[n, lo + j]
    r = x.dtype.type(1.0) / math.sqrt(x.dtype.type(s2 / m) + eps)
    for j in range(m):
        out[n, lo + j] = x[n, lo + j] * r * w[j]
    return r


@njit(fastmath=FAST, inline="always", **jit)
def _rms_vec_bwd(dout, x, n, lo, m, w, r, dw_part, c, woff, dskip, dx):
    """Undoes _rms_vec's out = x * r * w: dw_part[c, woff:woff+m] += dout * xhat (float64), and
    dx[n, lo:lo+m] = r * (dxhat - xhat * mean(dxhat * xhat)) [+ dskip], dxhat = dout * w, xhat = x * r.
    That is layernorm's dx without the mean's term: r = (mean(x^2) + eps)^(-1/2) has dr/dx_j = -r^3 x_j / m."""
    s2 = 0.0
    for j in range(m):
        xhat = x[n, lo + j] * r
        s2 += dout[n, lo + j] * w[j] * xhat
        dw_part[c, woff + j] += dout[n, lo + j] * xhat
    a2 = x.dtype.type(s2 / m)
    for j in range(m):
        g = r * (dout[n, lo + j] * w[j] - x[n, lo + j] * r * a2)
        dx[n, lo + j] = g if dskip is None else dskip[n, lo + j] + g


@njit(parallel=True, fastmath=FAST, **jit)
def _rmsnorm_fwd(x, w, eps, out, rstd):
    # x (N, d) -> out (N, d), rstd (N,)
    e = x.dtype.type(eps)
    for n in prange(x.shape[0]):
        rstd[n] = _rms_vec(x, n, 0, x.shape[1], w, e, out)


@njit(parallel=True, fastmath=FAST, **jit)
def _rmsnorm_bwd(dout, x, w, rstd, dskip, dx, dw_part):
    # forward: out = x * rstd * w. dw: each chunk of ROW_CHUNK rows sums into its own row of dw_part
    # (n_chunks, d), as _layernorm_bwd; dskip None compiles a version without the add.
    N, d = x.shape
    for c in prange(dw_part.shape[0]):
        for n in range(c * ROW_CHUNK, min(N, (c + 1) * ROW_CHUNK)):
            _rms_vec_bwd(dout, x, n, 0, d, w, rstd[n], dw_part, c, 0, dskip, dx)


@njit(parallel=True, fastmath=FAST, **jit)
def _qk_norm_fwd(qkv, wq, wk, eps, H, Hkv, out, rstd):
    # qkv (N, W) -> out (N, W), rstd (N, H + Hkv): heads 0..H-1 (queries) scaled by wq, H..H+Hkv-1
    # (keys) by wk, the value heads copied.
    N, W = qkv.shape
    hd = wq.shape[0]
    e = qkv.dtype.type(eps)
    for n in prange(N):
        for h in range(H + Hkv):
            rstd[n, h] = _rms_vec(qkv, n, h * hd, hd, wq if h < H else wk, e, out)
        for j in range((H + Hkv) * hd, W):
            out[n, j] = qkv[n, j]


@njit(parallel=True, fastmath=FAST, **jit)
def _qk_norm_bwd(dout, qkv, wq, wk, rstd, H, Hkv, dqkv, dw_part):
    # forward: out = x * rstd * w per head vector, wq shared by the H query heads, wk by the Hkv key
    # heads: every head's dw adds into columns 0..hd-1 (wq) or hd..2hd-1 (wk) of its chunk's row of
    # dw_part (n_chunks, 2 hd). The value heads passed through: their gradient is dout's.
    N, W = qkv.shape
    hd = wq.shape[0]
    for c in prange(dw_part.shape[0]):
        for n in range(c * ROW_CHUNK, min(N, (c + 1) * ROW_CHUNK)):
            for h in range(H + Hkv):
                q = h < H
                _rms_vec_bwd(dout, qkv, n, h * hd, hd, wq if q else wk, rstd[n, h], dw_part, c,
                             0 if q else hd, None, dqkv)
            for j in range((H + Hkv) * hd, W):
                dqkv[n, j] = dout[n, j]


# ---- rotary position embedding -------------------------------------------------------------------
@njit(parallel=True, fastmath=FAST, **jit)
def _rope(x, cos, sin, positions, n_rot, sign, out):
    # x (N, W) -> out (N, W): the first n_rot heads rotated by positions[n] * inv_freq, the rest copied.
    # sign = -1 rotates by -θ, the backward: rotations are orthogonal, so R(θ)^T = R(-θ).
    N, W = x.shape
    half = cos.shape[1]                                      # hd / 2
    for n in prange(N):
        p = positions[n]
        for h in range(n_rot):
            b = h * 2 * half                                 # head h's x1 at b.., x2 at b+half..
            for i in range(half):
                c, s = cos[p, i], sign * sin[p, i]
                x1, x2 = x[n, b + i], x[n, b + half + i]
                out[n, b + i] = x1 * c - x2 * s              # out1 = x1 cos - x2 sin
                out[n, b + half + i] = x2 * c + x1 * s       # out2 = x2 cos + x1 sin
        for j in range(n_rot * 2 * half, W):
            out[n, j] = x[n, j]


# ---- SwiGLU over a fused [gate | up] -------------------------------------------------------------
@njit(parallel=True, fastmath=FAST, **jit)
def _swiglu_fwd(gu, out):
    # gu (N, 2f) = [gate | up] -> out (N, f) = silu(gate) * up
    f = out.shape[1]
    one = gu.dtype.type(1.0)
    for n in prange(out.shape[0]):
        for j in range(f):
            g = gu[n, j]
            sig = one / (one + _exp(-g))                     # sigmoid(g); _exp clamps, so no inf here
            out[n, j] = g * sig * gu[n, f + j]


@njit(parallel=True, fastmath=FAST, **jit)
def _swiglu_bwd(dy, gu, dgu):
    # forward: y = silu(g) * u, silu(g) = g sig(g), so dsilu/dg = sig + g sig (1 - sig):
    #   dg = dy * u * (sig + g sig (1 - sig)),  du = dy * g * sig     -> dgu (N, 2f) = [dg | du]
    f = dy.shape[1]
    one = gu.dtype.type(1.0)
    for n in prange(dy.shape[0]):
        for j in range(f):
            g, u = gu[n, j], gu[n, f + j]
            sig = one / (one + _exp(-g))
            dgu[n, j] = dy[n, j] * u * (sig + g * sig * (one - sig))
            dgu[n, f + j] = dy[n, j] * g * sig


# ---- bias add / bias gradient / residual ---------------------------------------------------------
@njit(parallel=True, **jit)
def _add_bias_(y, b):
    for n in prange(y.shape[0]):
        for j in range(y.shape[1]):
            y[n, j] += b[j]


@njit(parallel=True, fastmath=FAST, **jit)
def _colsum_part(dy, part):
    # part[c] = sum of rows c*ROW_CHUNK ... of dy, in float64
    N, d = dy.shape
    for c in prange(part.shape[0]):
        for n in range(c * ROW_CHUNK, min(N, (c + 1) * ROW_CHUNK)):
            for j in range(d):
                part[c, j] += dy[n, j]


@njit(parallel=True, **jit)
def _add(a, b, out):
    for i in prange(out.shape[0]):
        out[i] = a[i] + b[i]


@njit(parallel=True, **jit)
def _add_(dst, src):
    for i in prange(dst.shape[0]):
        dst[i] += src[i]


@njit(parallel=True, **jit)
def _fill(a, value):
    for i in prange(a.shape[0]):
        a[i] = value


@njit(parallel=True, **jit)
def _mul(a, b, out):
    for i in prange(out.shape[0]):
        out[i] = a[i] * b[i]


@njit(parallel=True, **jit)
def _scale_(a, s):
    for i in prange(a.shape[0]):
        a[i] *= s


@njit(parallel=True, fastmath=FAST, **jit)
def _sumsq(a):
    s = 0.0
    for i in prange(a.shape[0]):
        s += np.float64(a[i]) * np.float64(a[i])
    return s


# ---- GELU (tanh approximation) -------------------------------------------------------------------
# tanh(u) from e = exp(-2|u|) <= 1: tanh|u| = (1 - e) / (1 + e) and 1 - tanh^2 = 4e / (1 + e)^2.
# Nothing overflows and neither loses digits to cancellation, and _exp vectorises where tanh does not.
@njit(parallel=True, fastmath=FAST, **jit)
def _gelu_fwd(x, out):
    one, two, half = x.dtype.type(1.0), x.dtype.type(2.0), x.dtype.type(0.5)
    c, a = x.dtype.type(GELU_C), x.dtype.type(0.044715)
    for i in prange(x.shape[0]):
        v = x[i]
        u = c * (v + a * v * v * v)
        e = _exp(-two * abs(u))
        t = (one - e) / (one + e)
        t = t if u >= 0 else -t
        out[i] = half * v * (one + t)


@njit(parallel=True, fastmath=FAST, **jit)
def _gelu_bwd(dy, x, dx):
    one, two, half, four = x.dtype.type(1.0), x.dtype.type(2.0), x.dtype.type(0.5), x.dtype.type(4.0)
    c, a, a3 = x.dtype.type(GELU_C), x.dtype.type(0.044715), x.dtype.type(3 * 0.044715)
    for i in prange(x.shape[0]):
        v = x[i]
        u = c * (v + a * v * v * v)
        e = _exp(-two * abs(u))
        t = (one - e) / (one + e)
        t = t if u >= 0 else -t
        sech2 = four * e / ((one + e) * (one + e))   # 1 - t^2
        dx[i] = dy[i] * (half * (one + t) + half * v * sech2 * c * (one + a3 * v * v))


# ---- causal attention over packed sequences ------------------------------------------------------
# qkv (N, W) = [q (H heads) | k (Hkv heads) | v (Hkv heads)], W = (H + 2 Hkv) hd; query head h reads
# key/value head h // G, G = H // Hkv (GPT-2: Hkv = H, G = 1). The forward runs one task per
# (sequence, query head), the backward one per (sequence, key/value head) (see _attention_bwd). A
# task first copies its heads' q, k, v (and dout) into small contiguous (L, hd) arrays: every inner
# loop then runs over hd contiguous elements and vectorises, where indexing the wide (N, W) rows
# directly measured 3-5x slower. Query row i works with O(L) scratch: its scores against keys 0..i,
# then their exps.
@njit(inline="always", **jit)
def _head(x, a, L, off, hd):
    """The (L, hd) block x[a:a+L, off:off+hd], copied contiguous."""
    out = np.empty((L, hd), dtype=x.dtype)
    for i in range(L):
        for t in range(hd):
            out[i, t] = x[a + i, off + t]
    return out


@njit(fastmath=FAST, inline="always", **jit)
def _rowdot(a, i, b, j):
    """a[i] . b[j], indexing the 2-D arrays directly: a row view per call would cost a reference
    count update each, which in these inner loops measured slower than the dot itself."""
    acc = a.dtype.type(0.0)
    for t in range(a.shape[1]):
        acc += a[i, t] * b[j, t]
    return acc


@njit(fastmath=FAST, inline="always", **jit)
def _rowdot2(a, b, i, c, d, j):
    """(a[i] . c[j], b[i] . d[j]) in one pass."""
    acc1 = a.dtype.type(0.0)
    acc2 = a.dtype.type(0.0)
    for t in range(a.shape[1]):
        acc1 += a[i, t] * c[j, t]
        acc2 += b[i, t] * d[j, t]
    return acc1, acc2


@njit(fastmath=FAST, inline="always", **jit)
def _accumulate_rows(dst, i, coef, src, n):
    """dst[i] += sum_{j < n} coef[j] * src[j], four source rows per pass: one row at a time, each
    pass would wait on the previous pass's store to dst[i]."""
    j = 0
    while j + 4 <= n:
        c0, c1, c2, c3 = coef[j], coef[j + 1], coef[j + 2], coef[j + 3]
        for t in range(dst.shape[1]):
            dst[i, t] += c0 * src[j, t] + c1 * src[j + 1, t] + c2 * src[j + 2, t] + c3 * src[j + 3, t]
        j += 4
    while j < n:
        c0 = coef[j]
        for t in range(dst.shape[1]):
            dst[i, t] += c0 * src[j, t]
        j += 1


@njit(parallel=True, fastmath=FAST, **jit)
def _attention_fwd(qkv, cu, H, Hkv, out, lse):
    # out (N, H hd), lse (N, H): each row's log-sum-exp of its scaled scores, all the backward needs.
    hd = out.shape[1] // H
    G = H // Hkv
    k_off, v_off = H * hd, (H + Hkv) * hd                   # where the key and value heads start
    scale = qkv.dtype.type(1.0 / math.sqrt(hd))
    zero, one = qkv.dtype.type(0.0), qkv.dtype.type(1.0)
    S = cu.shape[0] - 1
    for task in prange(S * H):
        s, h = task // H, task % H
        a, L = cu[s], cu[s + 1] - cu[s]
        q = _head(qkv, a, L, h * hd, hd)                     # (L, hd)
        k = _head(qkv, a, L, k_off + (h // G) * hd, hd)      # (L, hd) the group's key head
        v = _head(qkv, a, L, v_off + (h // G) * hd, hd)      # (L, hd)
        y = np.zeros((L, hd), dtype=qkv.dtype)               # (L, hd) unnormalised outputs
        p = np.empty(L, dtype=qkv.dtype)                     # (L,) row i's scores, then exps
        for i in range(L):
            n = i + 1                                         # causal: keys 0..i
            mx = qkv.dtype.type(-np.inf)
            for j in range(n):
                p[j] = scale * _rowdot(q, i, k, j)
                mx = max(mx, p[j])
            tot = zero
            for j in range(n):
                p[j] = _exp(p[j] - mx)
                tot += p[j]
            _accumulate_rows(y, i, p, v, n)
            inv = one / tot
            for t in range(hd):
                out[a + i, h * hd + t] = y[i, t] * inv
            lse[a + i, h] = mx + math.log(tot)


@njit(fastmath=FAST, inline="always", **jit)
def _attention_head_bwd(q, k, v, do, o, lse, a, h, scale, p, ds, dq, dk, dv):
    """One query head's share of _attention_bwd: dq (L, hd) written, dk and dv (L, hd) added into."""
    L, hd = q.shape
    for i in range(L):
        n = i + 1
        for j in range(n):
            sij, dpij = _rowdot2(q, do, i, k, v, j)      # q_i . k_j, dout_i . v_j
            p[j] = scale * sij
            ds[j] = dpij
        D = _rowdot(do, i, o, i)
        m = lse[a + i, h]
        for j in range(n):
            p[j] = _exp(p[j] - m)
            ds[j] = scale * p[j] * (ds[j] - D)
        _accumulate_rows(dq, i, ds, k, n)
        # one destination array per loop: with several, numba cannot rule out aliasing and
        # the loops stop vectorising
        for j in range(n):
            dsj = ds[j]
            for t in range(hd):
                dk[j, t] += dsj * q[i, t]
        for j in range(n):
            pj = p[j]
            for t in range(hd):
                dv[j, t] += pj * do[i, t]


@njit(parallel=True, fastmath=FAST, **jit)
def _attention_bwd(dout, qkv, out, lse, cu, H, Hkv, dqkv):
    # p_ij = exp(s_ij - lse_i) recomputed; D_i = dout_i . out_i = sum_j p_ij dp_ij;
    # ds_ij = scale * p_ij (dp_ij - D_i) with dp_ij = dout_i . v_j; then dq_i = sum_j ds_ij k_j,
    # dk_j += ds_ij q_i, dv_j += p_ij dout_i. A key/value head feeds the G query heads of its group,
    # so its dk, dv sum over all of them: one task per (sequence, key/value head) loops over the
    # group's query heads into its own dk, dv, and writes only its own heads' columns of its own
    # sequence's rows. No two tasks touch one element, and with G = 1 (GPT-2) the arithmetic is a
    # task per (sequence, head) exactly as before.
    hd = dout.shape[1] // H
    G = H // Hkv
    k_off, v_off = H * hd, (H + Hkv) * hd
    scale = qkv.dtype.type(1.0 / math.sqrt(hd))
    S = cu.shape[0] - 1
    for task in prange(S * Hkv):
        s, kvh = task // Hkv, task % Hkv
        a, L = cu[s], cu[s + 1] - cu[s]
        k = _head(qkv, a, L, k_off + kvh * hd, hd)           # (L, hd)
        v = _head(qkv, a, L, v_off + kvh * hd, hd)           # (L, hd)
        dk = np.zeros((L, hd), dtype=qkv.dtype)              # (L, hd) summed over the group
        dv = np.zeros((L, hd), dtype=qkv.dtype)
        p = np.empty(L, dtype=qkv.dtype)                     # (L,) row i's probabilities
        ds = np.empty(L, dtype=qkv.dtype)                    # (L,) row i's score gradients
        for h in range(kvh * G, (kvh + 1) * G):
            q = _head(qkv, a, L, h * hd, hd)                 # (L, hd)
            do = _head(dout, a, L, h * hd, hd)               # (L, hd)
            o = _head(out, a, L, h * hd, hd)                 # (L, hd)
            dq = np.zeros((L, hd), dtype=qkv.dtype)
            _attention_head_bwd(q, k, v, do, o, lse, a, h, scale, p, ds, dq, dk, dv)
            for i in range(L):
                for t in range(hd):
                    dqkv[a + i, h * hd + t] = dq[i, t]
        for i in range(L):
            for t in range(hd):
                dqkv[a + i, k_off + kvh * hd + t] = dk[i, t]
                dqkv[a + i, v_off + kvh * hd + t] = dv[i, t]


@njit(parallel=True, fastmath=FAST, **jit)
def _attention_decode(qkv, k_cache, v_cache, lens, H, out):
    # qkv (S, W) one new token per cache row, k_cache, v_cache (S, Hkv, T, hd) -> out (S, H hd): query
    # head h of row s attends over cache positions [0, lens[s]) of cache head h // G. One task per
    # (row, cache head), looping over the G query heads that read it, so each cache block is
    # fetched by one task while the group shares it.
    Hkv, hd = k_cache.shape[1], k_cache.shape[3]
    G = H // Hkv
    scale = qkv.dtype.type(1.0 / math.sqrt(hd))
    zero, one = qkv.dtype.type(0.0), qkv.dtype.type(1.0)
    S = qkv.shape[0]
    for task in prange(S * Hkv):
        s, c = task // Hkv, task % Hkv
        n = lens[s]
        k, v = k_cache[s, c], v_cache[s, c]                  # (T, hd) views, rows 0..n-1 in use
        p = np.empty(n, dtype=qkv.dtype)                     # (n,) the scores, then their exps
        for h in range(c * G, (c + 1) * G):
            q = _head(qkv, s, 1, h * hd, hd)                 # (1, hd) this query head
            y = np.zeros((1, hd), dtype=qkv.dtype)           # (1, hd) unnormalised output
            mx = qkv.dtype.type(-np.inf)
            for j in range(n):
                p[j] = scale * _rowdot(q, 0, k, j)
                mx = max(mx, p[j])
            tot = zero
            for j in range(n):
                p[j] = _exp(p[j] - mx)
                tot += p[j]
            _accumulate_rows(y, 0, p, v, n)
            inv = one / tot
            for t in range(hd):
                out[s, h * hd + t] = y[0, t] * inv


# ---- fused softmax + cross-entropy over a chunk of logits rows -----------------------------------
@njit(fastmath=FAST, **jit)
def _softmax_row_(row, t):
    # row <- exp(row - max(row)) in place (softmax's numerators) -> (loss, their sum): the row's
    # cross-entropy logsumexp(row) - row[t] (float64) and the normaliser the gradient divides by.
    lt = row[t]
    mx = row[0]
    for j in range(1, row.shape[0]):
        mx = max(mx, row[j])
    tot = 0.0
    for j in range(row.shape[0]):
        e = _exp(row[j] - mx)
        row[j] = e
        tot += e
    return math.log(tot) - (lt - mx), tot


@njit(parallel=True, fastmath=FAST, **jit)
def _xent(logits, targets, losses, grad, scale):
    # losses[r] = logsumexp(logits_r) - logits_r[t_r] (float64). logits is scratch: with grad, logits_r
    # ends as scale * (softmax(logits_r) - onehot(t_r)), without it as the softmax's numerators.
    R, V = logits.shape
    for r in prange(R):
        t = targets[r]
        losses[r], tot = _softmax_row_(logits[r], t)
        if grad:
            f = logits.dtype.type(scale / tot)
            for j in range(V):
                logits[r, j] *= f
            logits[r, t] -= logits.dtype.type(scale)


@njit(parallel=True, fastmath=FAST, **jit)
def _xent_bf16(logits, targets, losses, scale, grad16):
    # _xent with the gradient written as bf16 bits into grad16 (R, V), the next matmuls' operand,
    # in the pass that scales it: no float32 gradient pass and no separate rounding pass.
    R, V = logits.shape
    for r in prange(R):
        t = targets[r]
        losses[r], tot = _softmax_row_(logits[r], t)
        f = logits.dtype.type(scale / tot)
        for j in range(V):
            grad16[r, j] = bf16.bf16_round(logits[r, j] * f)
        grad16[r, t] = bf16.bf16_round(logits[r, t] * f - logits.dtype.type(scale))


# ---- AdamW ---------------------------------------------------------------------------------------
@njit(parallel=True, **jit)
def _adamw(p, g, m, v, decay, b1, omb1, b2, omb2, step_size, bc2_sqrt, eps):
    # torch.optim.AdamW's order of operations, every scalar already in the arrays' dtype; no
    # fast-math here, so each element rounds exactly as the reference does.
    for i in prange(p.shape[0]):
        gi = g[i]
        mi = b1 * m[i] + omb1 * gi
        vi = b2 * v[i] + omb2 * gi * gi
        m[i], v[i] = mi, vi
        p[i] = p[i] * decay - step_size * (mi / (math.sqrt(vi) / bc2_sqrt + eps))


@njit(parallel=True, **jit)
def _adamw_bf16(p, g, m, v, p16, decay, b1, omb1, b2, omb2, step_size, bc2_sqrt, eps):
    # _adamw, also writing the updated weight's bf16 copy p16 (the matmuls' operand) in the same pass.
    for i in prange(p.shape[0]):
        gi = g[i]
        mi = b1 * m[i] + omb1 * gi
        vi = b2 * v[i] + omb2 * gi * gi
        m[i], v[i] = mi, vi
        pi = p[i] * decay - step_size * (mi / (math.sqrt(vi) / bc2_sqrt + eps))
        p[i] = pi
        p16[i] = bf16.bf16_round(pi)


# ---- lean AdamW state (formats: quant.py) --------------------------------------------------------
@intrinsic
def _bits_from_f32(typingctx, x):
    """The bit pattern of a float32, as a uint64 (the inverse of _f32_from_bits)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))
    return types.uint64(x), codegen


U32, U16 = np.uint64(quant.MASK32), np.uint64(0xFFFF)
SHIFT = np.uint64(quant.ROUND_BITS)


@njit(**jit)
def _bf16_round(x, i, salt):
    """quant.bf16_round for one float32 x at element i: uint64 arithmetic with typed constants
    throughout (numba would turn uint64 mixed with int64 into float64)."""
    h = (np.uint64(i) * np.uint64(quant.GOLDEN) + salt) & U32
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & U32
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & U32
    h ^= h >> np.uint64(16)
    return np.uint16(((_bits_from_f32(x) + (h >> SHIFT)) >> SHIFT) & U16)


@njit(parallel=True, **jit)
def _adamw_bf16_moments(p, g, m, v, decay, b1, omb1, b2, omb2, step_size, bc2_sqrt, eps, salt_m, salt_v):
    # _adamw's arithmetic, the moments read from and written back to bfloat16 bits.
    for i in prange(p.shape[0]):
        gi = g[i]
        mi = b1 * _f32_from_bits(np.uint32(m[i]) << np.uint32(16)) + omb1 * gi
        vi = b2 * _f32_from_bits(np.uint32(v[i]) << np.uint32(16)) + omb2 * gi * gi
        p[i] = p[i] * decay - step_size * (mi / (math.sqrt(vi) / bc2_sqrt + eps))
        m[i], v[i] = _bf16_round(mi, i, salt_m), _bf16_round(vi, i, salt_v)


@njit(**jit)
def _nearest(mid, x):
    """The number of the 255 midpoints below x (np.searchsorted(mid, x, side="left")), by binary
    lifting: eight fixed steps of 128, 64, ... 1, each a compare and an add, no data-dependent branch
    (a bisection's branches mispredict half the time: 4x slower per value)."""
    pos = 0
    for step in (128, 64, 32, 16, 8, 4, 2, 1):
        pos += step * (mid[pos + step - 1] < x)
    return pos


@njit(parallel=True, **jit)
def _adamw_8bit(p, g, qm, sm, qv, sv, decay, b1, omb1, b2, omb2, step_size, bc2_sqrt, eps,
                mcode, mmid, vcode, vmid):
    # One block per task, two passes: the first updates p and finds the new moments' scales, the
    # second recomputes the same new moments from the still unchanged codes and quantizes them.
    n, zero, one = p.shape[0], np.float32(0.0), np.float32(1.0)
    for b in prange(sm.shape[0]):
        lo, hi = b * quant.BLOCK, min((b + 1) * quant.BLOCK, n)
        amax_m, amax_w = zero, zero
        for i in range(lo, hi):
            gi, w = g[i], vcode[qv[i]] * sv[b]
            mi = b1 * (mcode[qm[i]] * sm[b]) + omb1 * gi
            root = math.sqrt(b2 * (w * w) + omb2 * gi * gi)
            p[i] = p[i] * decay - step_size * (mi / (root / bc2_sqrt + eps))
            amax_m, amax_w = max(amax_m, abs(mi)), max(amax_w, root)
        div_m = amax_m if amax_m > zero else one
        div_w = amax_w if amax_w > zero else one
        for i in range(lo, hi):
            gi, w = g[i], vcode[qv[i]] * sv[b]
            mi = b1 * (mcode[qm[i]] * sm[b]) + omb1 * gi
            root = math.sqrt(b2 * (w * w) + omb2 * gi * gi)
            qm[i], qv[i] = _nearest(mmid, mi / div_m), _nearest(vmid, root / div_w)
        sm[b], sv[b] = amax_m, amax_w


class NumbaBackend(NumpyBackend):
    name = "numba"

    def __init__(self, dtype="float32"):
        if dtype not in ("float32", "float64", "bfloat16"):
            raise ValueError(f"numba backend supports float32, float64 and bfloat16, not {dtype!r}")
        if dtype == "bfloat16" and bf16.problem():
            raise ValueError(f"numba backend, dtype bfloat16: {bf16.problem()}")
        super().__init__("float32" if dtype == "bfloat16" else dtype)  # the store dtype
        self.dtype = dtype
        self.bf16 = dtype == "bfloat16"
        self._w16 = {}  # id(weight) -> (weakref to it, its bf16 copy): bfloat16 only
        heap.keep_freed_memory()

    def _bf16_weight(self, w):
        """The bf16 copy of weight w (same shape), made on first use; adamw_step keeps it current."""
        entry = self._w16.get(id(w))
        if entry is None or entry[0]() is not w:
            entry = (weakref.ref(w), bf16.to_bf16(w))
            self._w16[id(w)] = entry
            weakref.finalize(w, self._w16.pop, id(w), None)
        return entry[1]

    def _empty(self, shape):
        return np.empty(shape, dtype=self.np_dtype)

    def zeros_like(self, x):
        out = np.empty(x.shape, dtype=x.dtype)
        _fill(_flat(out), out.dtype.type(0.0))  # parallel: the heap memory is reused, not fresh zeros
        return out

    def add_(self, dst, src):
        _add_(_flat(dst), src.ravel())

    # ---- embedding ---------------------------------------------------------------------------
    def embedding_forward(self, tokens, positions, wte, wpe):
        out = self._empty((tokens.shape[0], wte.shape[1]))    # (N, d)
        _embedding_fwd(tokens, positions, wte, wpe, out)
        return out

    def embedding_backward(self, dwte, dwpe, dx, tokens, positions):
        _embedding_bwd(dwte, dwpe, dx, tokens, positions)

    def token_embedding_forward(self, tokens, wte):
        out = self._empty((tokens.shape[0], wte.shape[1]))    # (N, d)
        _token_embedding_fwd(tokens, wte, out)
        return out

    def token_embedding_backward(self, dwte, dx, tokens):
        _token_embedding_bwd(dwte, dx, tokens)

    # ---- layernorm ---------------------------------------------------------------------------
    def layernorm_forward(self, x, w, b):
        N = x.shape[0]
        out, mean, rstd = self._empty(x.shape), self._empty(N), self._empty(N)
        _layernorm_fwd(x, w, b, out, mean, rstd)
        return out, mean, rstd

    def layernorm_backward(self, dout, x, w, mean, rstd, dskip=None):
        N, d = x.shape
        dx = self._empty(x.shape)                             # (N, d)
        n_chunks = (N + ROW_CHUNK - 1) // ROW_CHUNK
        dw_part, db_part = np.zeros((n_chunks, d)), np.zeros((n_chunks, d))  # float64 partials
        _layernorm_bwd(dout, x, w, mean, rstd, dskip, dx, dw_part, db_part)
        return dx, dw_part.sum(axis=0).astype(self.np_dtype), db_part.sum(axis=0).astype(self.np_dtype)

    # ---- RMSNorm, q/k norm, RoPE (the Llama family) -------------------------------------------
    def _chunk_partials(self, N, width):
        """float64 partial sums for a column reduction over N rows: one row per ROW_CHUNK rows."""
        return np.zeros(((N + ROW_CHUNK - 1) // ROW_CHUNK, width))

    def rmsnorm_forward(self, x, w, eps):
        out, rstd = self._empty(x.shape), self._empty(x.shape[0])  # (N, d), (N,)
        _rmsnorm_fwd(x, w, eps, out, rstd)
        return out, rstd

    def rmsnorm_backward(self, dout, x, w, rstd, dskip=None):
        dx = self._empty(x.shape)                             # (N, d)
        dw_part = self._chunk_partials(*x.shape)              # (n_chunks, d)
        _rmsnorm_bwd(dout, x, w, rstd, dskip, dx, dw_part)
        return dx, dw_part.sum(axis=0).astype(self.np_dtype)

    def qk_norm_forward(self, qkv, wq, wk, eps, n_heads, n_kv_heads):
        out = self._empty(qkv.shape)                          # (N, W)
        rstd = self._empty((qkv.shape[0], n_heads + n_kv_heads))  # (N, H + Hkv)
        _qk_norm_fwd(qkv, wq, wk, eps, n_heads, n_kv_heads, out, rstd)
        return out, rstd

    def qk_norm_backward(self, dout, qkv, wq, wk, rstd, n_heads, n_kv_heads):
        hd = wq.shape[0]
        dqkv = self._empty(qkv.shape)                         # (N, W)
        dw_part = self._chunk_partials(qkv.shape[0], 2 * hd)  # (n_chunks, 2 hd): [dwq | dwk]
        _qk_norm_bwd(dout, qkv, wq, wk, rstd, n_heads, n_kv_heads, dqkv, dw_part)
        dw = dw_part.sum(axis=0).astype(self.np_dtype)        # (2 hd,)
        return dqkv, dw[:hd], dw[hd:]

    def rope_forward(self, qkv, cos, sin, positions, n_rot):
        out = self._empty(qkv.shape)                          # (N, W)
        _rope(qkv, cos, sin, positions, n_rot, qkv.dtype.type(1.0), out)
        return out

    def rope_backward(self, dout, cos, sin, positions, n_rot):
        dqkv = self._empty(dout.shape)                        # (N, W)
        _rope(dout, cos, sin, positions, n_rot, dout.dtype.type(-1.0), dqkv)  # R(θ)^T = R(-θ)
        return dqkv

    # ---- linear ------------------------------------------------------------------------------
    def linear_forward(self, x, w, b):
        y = self._empty((x.shape[0], w.shape[1]))             # (N, out)
        if self.bf16:
            bf16.gemm(bf16.to_bf16(x), self._bf16_weight(w), y)
        else:
            np.matmul(x, w, out=y)
        if b is not None:
            _add_bias_(y, b)
        return y

    def _colsum(self, dy):
        part = np.zeros(((dy.shape[0] + ROW_CHUNK - 1) // ROW_CHUNK, dy.shape[1]))  # float64
        _colsum_part(dy, part)
        return part.sum(axis=0).astype(self.np_dtype)

    def linear_backward(self, dy, x, w, need_dw=True):
        if self.bf16:
            dy16 = bf16.to_bf16(dy)                           # (N, out) bits
            dx = self._empty((dy.shape[0], w.shape[0]))       # (N, in)
            bf16.gemm(dy16, self._bf16_weight(w).T, dx)       # dx = dy @ w.T
            dw = None
            if need_dw:
                dw = self._empty(w.shape)                     # (in, out)
                bf16.gemm(bf16.to_bf16(x).T, dy16, dw)        # dw = x.T @ dy
            return dx, dw, self._colsum(dy)
        dx = dy @ w.T                                         # (N, in)
        dw = x.T @ dy if need_dw else None                    # (in, out)
        return dx, dw, self._colsum(dy)

    # LoRA: in float32 and float64 numpy's, inherited (both halves are matmuls of rank r that BLAS runs
    # either way; nothing is left around them to fuse). Under bfloat16 they run through oneDNN like
    # every other matmul of the step, bf16 operands and float32 accumulation, on the GEMM threads' own
    # pool: an OpenBLAS call between those GEMMs leaves OpenBLAS's threads spinning on the cores the
    # pool needs (a SmolLM2-135M LoRA step on 2 cores: 6.00 s before, 3.38 s after; BENCHMARKS.md).
    def lora_down_forward(self, x, a, scale):
        if not self.bf16:
            return super().lora_down_forward(x, a, scale)
        u = self._empty((x.shape[0], a.shape[1]))             # (N, r)
        bf16.gemm(bf16.to_bf16(x), self._bf16_weight(a), u)   # u = x @ a
        u *= self.np_dtype.type(scale)                        # u = scale * (x @ a)
        return u

    def lora_down_backward(self, du, x, a, scale):
        if not self.bf16:
            return super().lora_down_backward(du, x, a, scale)
        # undoes u = scale * (x @ a)
        dxa16 = bf16.to_bf16(du * self.np_dtype.type(scale))  # (N, r) bits
        dx = self._empty((du.shape[0], a.shape[0]))           # (N, in)
        bf16.gemm(dxa16, self._bf16_weight(a).T, dx)          # dx = dxa @ a.T
        da = self._empty(a.shape)                             # (in, r)
        bf16.gemm(bf16.to_bf16(x).T, dxa16, da)               # da = x.T @ dxa
        return dx, da

    def lora_forward(self, y, x, a, b, scale, col=0):
        if not self.bf16:
            return super().lora_forward(y, x, a, b, scale, col)
        u = self.lora_down_forward(x, a, scale)               # (N, r)
        up = self._empty((x.shape[0], b.shape[1]))            # (N, out)
        bf16.gemm(bf16.to_bf16(u), self._bf16_weight(b), up)  # up = u @ b
        y[:, col:col + b.shape[1]] += up                      # a column slice of y, in place
        return u

    def lora_backward(self, dy, x, u, a, b, scale, col=0):
        if not self.bf16:
            return super().lora_backward(dy, x, u, a, b, scale, col)
        # undoes y[:, col:col+out] += u @ b
        dys16 = bf16.to_bf16(np.ascontiguousarray(dy[:, col:col + b.shape[1]]))  # (N, out) bits
        db = self._empty(b.shape)                             # (r, out)
        bf16.gemm(bf16.to_bf16(u).T, dys16, db)               # db = u.T @ dys
        du = self._empty((dy.shape[0], b.shape[0]))           # (N, r)
        bf16.gemm(dys16, self._bf16_weight(b).T, du)          # du = dys @ b.T
        dx, da = self.lora_down_backward(du, x, a, scale)
        return dx, da, db

    # ---- attention ---------------------------------------------------------------------------
    def attention_forward(self, qkv, cu_seqlens, n_heads, max_seqlen, n_kv_heads=None):
        N, W = qkv.shape
        Hkv = n_kv_heads or n_heads
        hd = W // (n_heads + 2 * Hkv)
        out = self._empty((N, n_heads * hd))                  # (N, H hd)
        lse = self._empty((N, n_heads))                       # (N, H)
        _attention_fwd(qkv, cu_seqlens, n_heads, Hkv, out, lse)
        return out, lse

    def attention_backward(self, dout, qkv, out, ctx, cu_seqlens, n_heads, max_seqlen, n_kv_heads=None):
        dqkv = self._empty(qkv.shape)                         # (N, W)
        _attention_bwd(dout, qkv, out, ctx, cu_seqlens, n_heads, n_kv_heads or n_heads, dqkv)
        return dqkv

    # kv_cache_write: numpy's, inherited: one fancy-indexed copy of N (Hkv, hd) blocks, nothing to fuse.
    def attention_decode(self, qkv, k_cache, v_cache, lens, n_heads, max_len):
        out = self._empty((qkv.shape[0], n_heads * k_cache.shape[3]))  # (S, H hd)
        _attention_decode(qkv, k_cache, v_cache, lens, n_heads, out)
        return out

    # ---- SwiGLU ------------------------------------------------------------------------------
    def swiglu_forward(self, gu):
        out = self._empty((gu.shape[0], gu.shape[1] // 2))    # (N, f)
        _swiglu_fwd(gu, out)
        return out

    def swiglu_backward(self, dy, gu):
        dgu = self._empty(gu.shape)                           # (N, 2f)
        _swiglu_bwd(dy, gu, dgu)
        return dgu

    # ---- GELU, residual, dropout -------------------------------------------------------------
    def gelu_forward(self, x):
        out = self._empty(x.shape)
        _gelu_fwd(x.ravel(), _flat(out))
        return out

    def gelu_backward(self, dy, x):
        dx = self._empty(x.shape)
        _gelu_bwd(dy.ravel(), x.ravel(), _flat(dx))
        return dx

    def residual_forward(self, a, b):
        out = self._empty(a.shape)
        _add(a.ravel(), b.ravel(), _flat(out))
        return out

    def dropout_backward(self, dy, mask):
        dx = self._empty(dy.shape)
        _mul(dy.ravel(), mask.ravel(), _flat(dx))
        return dx

    # ---- fused head + cross-entropy ----------------------------------------------------------
    def head_loss(self, h, w, targets, dw=None, grad_scale=1.0, need_dh=False, lora=None, dw_fresh=False):
        rows = np.flatnonzero(targets != IGNORE_INDEX)        # (M,) only these rows need logits
        if dw is not None and dw_fresh and len(rows) == 0:
            _fill(_flat(dw), dw.dtype.type(0.0))
        V = w.shape[0]
        chunk = max(1, HEAD_CHUNK_BYTES // (V * self.np_dtype.itemsize))
        grad = dw is not None or need_dh
        dh = np.zeros(h.shape, dtype=h.dtype) if grad else None  # (N, d)
        logits_buf = self._empty((min(chunk, len(rows)), V))  # (R, V) each chunk's logits, then their grads
        if self.bf16:
            return self._head_loss_bf16(h, w, targets, rows, chunk, dw, dh, logits_buf, grad_scale, lora, dw_fresh)
        one_write = dw_fresh and len(rows) <= chunk          # one chunk writing a fresh dw: no partial
        dw_part = self._empty(dw.shape) if dw is not None and not one_write else None  # (V, d) a chunk's dW
        loss_sum = 0.0
        for c in range(0, len(rows), chunk):
            r = rows[c:c + chunk]                             # (R,)
            hr = h[r]                                         # (R, d)
            logits = logits_buf[:len(r)]
            np.matmul(hr, w.T, out=logits)
            if lora is not None:
                logits += lora[0][r] @ lora[1]                # (R, V) += u (R, r) @ b (r, V)
            losses = np.empty(len(r))                         # (R,) float64
            _xent(logits, targets[r], losses, grad, grad_scale)
            loss_sum += float(losses.sum())
            if not grad:
                continue
            dh[r] = logits @ w                                # (R, d)
            if dw is not None and dw_fresh and c == 0:
                np.matmul(logits.T, hr, out=dw)               # (V, d) the first chunk writes dw outright
            elif dw is not None:
                np.matmul(logits.T, hr, out=dw_part)          # (V, d)
                _add_(_flat(dw), dw_part.ravel())
            if lora is not None:                              # undoes logits += u @ b
                lora[2][r] = logits @ lora[1].T               # du (R, r)
                self.add_(lora[3], lora[0][r].T @ logits)     # db (r, V)
        return np.float64(loss_sum), len(rows), dh

    def _head_loss_bf16(self, h, w, targets, rows, chunk, dw, dh, logits_buf, grad_scale, lora, dw_fresh):
        # head_loss with bf16 matmuls: the gradient leaves _xent_bf16 as bf16 bits, and the weight
        # gradient accumulates straight into dw (beta = 1; beta = 0 for a fresh dw's first chunk),
        # with no per-chunk dW buffer to add. The head's LoRA adapter (rank r, small) stays in
        # float32 on both sides.
        w16 = self._bf16_weight(w)                            # (V, d) bits
        grad16 = np.empty(logits_buf.shape, dtype=np.uint16) if dh is not None else None  # (R, V)
        loss_sum = 0.0
        for c in range(0, len(rows), chunk):
            r = rows[c:c + chunk]                             # (R,)
            hr16 = bf16.to_bf16(h[r])                         # (R, d) bits
            logits = logits_buf[:len(r)]
            bf16.gemm(hr16, w16.T, logits)                    # logits = h @ w.T
            if lora is not None:
                logits += lora[0][r] @ lora[1]                # (R, V) += u (R, r) @ b (r, V)
            losses = np.empty(len(r))                         # (R,) float64
            if dh is None:
                _xent(logits, targets[r], losses, False, grad_scale)
            else:
                g16 = grad16[:len(r)]
                _xent_bf16(logits, targets[r], losses, grad_scale, g16)
                dhr = self._empty((len(r), h.shape[1]))       # (R, d)
                bf16.gemm(g16, w16, dhr)                      # dh = dlogits @ w
                dh[r] = dhr
                if dw is not None:
                    bf16.gemm(g16.T, hr16, dw, beta=0.0 if dw_fresh and c == 0 else 1.0)  # dw += dlogits.T @ h
                if lora is not None:                          # undoes logits += u @ b
                    dlogits = bf16.from_bf16(g16)             # (R, V) float32
                    lora[2][r] = dlogits @ lora[1].T          # du (R, r)
                    self.add_(lora[3], lora[0][r].T @ dlogits)  # db (r, V)
            loss_sum += float(losses.sum())
        return np.float64(loss_sum), len(rows), dh

    # ---- optimizer ---------------------------------------------------------------------------
    def adamw_step(self, p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
        f = self.np_dtype.type
        entry = self._w16.get(id(p))
        kernel, copy = (_adamw, ()) if entry is None or entry[0]() is not p else (_adamw_bf16, (_flat(entry[1]),))
        kernel(_flat(p), g.ravel(), _flat(m), _flat(v), *copy,
               f(1.0 - lr * weight_decay), f(beta1), f(1.0 - beta1), f(beta2), f(1.0 - beta2),
               f(lr / (1.0 - beta1 ** step)), f(math.sqrt(1.0 - beta2 ** step)), f(eps))

    def _scalars(self, lr, beta1, beta2, eps, weight_decay, step):
        f = np.float32  # lean state: float32 master weights only
        return (f(1.0 - lr * weight_decay), f(beta1), f(1.0 - beta1), f(beta2), f(1.0 - beta2),
                f(lr / (1.0 - beta1 ** step)), f(math.sqrt(1.0 - beta2 ** step)), f(eps))

    def adamw_step_bf16(self, p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, key):
        _adamw_bf16_moments(_flat(p), g.ravel(), m, v, *self._scalars(lr, beta1, beta2, eps, weight_decay, step),
                            np.uint64(quant.round_salt(step, key, 0)), np.uint64(quant.round_salt(step, key, 1)))
        self._refresh_bf16_copy(p)

    def adamw_step_8bit(self, p, g, qm, sm, qv, sv, lr, beta1, beta2, eps, weight_decay, step):
        _adamw_8bit(_flat(p), g.ravel(), qm, sm, qv, sv, *self._scalars(lr, beta1, beta2, eps, weight_decay, step),
                    quant.M_CODE, quant.M_MID, quant.V_CODE, quant.V_MID)
        self._refresh_bf16_copy(p)

    def _refresh_bf16_copy(self, p):
        # With dtype bfloat16 the matmuls read p's bf16 copy: the lean kernels do not write it, so
        # it is rewritten here after the update (adamw_step's own kernel writes it in its pass).
        entry = self._w16.get(id(p))
        if entry is not None and entry[0]() is p:
            bf16.to_bf16(p, out=entry[1])

    def global_norm(self, grads):
        return math.sqrt(sum(_sumsq(g.ravel()) for g in grads))

    def scale_(self, grads, s):
        for g in grads:
            _scale_(_flat(g), self.np_dtype.type(s))

