"""The reference backend: plain numpy, written to be read. Every other backend is tested against it.

Each kernel's forward sits beside its backward, and each backward line quotes the forward line it
undoes (as llm.c does). Shapes: N positions, d width, H query heads, Hkv key/value heads (H for
GPT-2), hd head width, W = (H + 2 Hkv) hd the fused qkv, V vocabulary, L one sequence's length.
docs/backprop.md derives every backward here; `minisft study OP` runs them stage by stage on tiny
inputs and checks each against finite differences.
"""
import math

import numpy as np

from . import quant
from .constants import IGNORE_INDEX, LN_EPS
from .interface import Backend
from .optim_state import HOST_DTYPES

# Python floats, not numpy float64 scalars, so that float32 arrays times a constant stay float32.
GELU_C = math.sqrt(2.0 / math.pi)  # tanh-GELU constant
HEAD_CHUNK_ROWS = 256  # rows of logits held at once by the fused head: 256 x 50257 x 4 B = 51 MB, never (N, V)


def softmax_forward(scores):
    """Softmax over the last axis: p_ij = exp(s_ij) / sum_k exp(s_ik). Entries of -inf get p = 0."""
    shifted = scores - scores.max(axis=-1, keepdims=True)  # (..., L) the same softmax; exp cannot overflow
    e = np.exp(shifted)                                    # (..., L)
    return e / e.sum(axis=-1, keepdims=True)               # (..., L) rows sum to 1


def softmax_backward(dp, p):
    """Forward was p = softmax(s) along each row. Then dp_j/ds_i = p_j (delta_ij - p_i), so
        ds_i = sum_j dp_j p_j (delta_ij - p_i) = p_i (dp_i - sum_j dp_j p_j):
    each score's gradient is its probability times how far its dp is above the row's p-weighted mean.
    Masked entries have p = 0 and so get no gradient."""
    return p * (dp - (dp * p).sum(axis=-1, keepdims=True))  # (..., L)


class NumpyBackend(Backend):
    name = "numpy"

    def __init__(self, dtype="float32"):
        if dtype not in ("float32", "float64"):
            raise ValueError(f"numpy backend supports float32 and float64, not {dtype!r}")
        self.dtype = dtype
        self.np_dtype = np.dtype(dtype)

    # ---- array handling ------------------------------------------------------------------------
    def from_numpy(self, x):
        return np.array(x, dtype=self.np_dtype)  # always a copy: the caller's array stays theirs

    def index(self, x):
        return np.asarray(x, dtype=np.int64)

    def to_numpy(self, x):
        return np.array(x)

    def zeros_like(self, x):
        return np.zeros(x.shape, dtype=x.dtype)

    def empty_like(self, x):
        return np.empty(x.shape, dtype=x.dtype)

    def rng(self, seed):
        return np.random.default_rng(seed)

    def item(self, x):
        return float(x)

    def add_(self, dst, src):
        dst += src

    # ---- token + position embedding ------------------------------------------------------------
    def embedding_forward(self, tokens, positions, wte, wpe):
        return wte[tokens] + wpe[positions]  # (N, d)

    def embedding_backward(self, dwte, dwpe, dx, tokens, positions):
        # The same token (and every position index) appears many times: a scatter-ADD, not a
        # scatter, or repeated rows would overwrite each other.
        np.add.at(dwte, tokens, dx)      # dwte (V, d) += one-hot(tokens)^T @ dx
        np.add.at(dwpe, positions, dx)   # dwpe (C, d)

    def token_embedding_forward(self, tokens, wte):
        return wte[tokens]                            # (N, d)

    def token_embedding_backward(self, dwte, dx, tokens):
        np.add.at(dwte, tokens, dx)                   # dwte (V, d) += one-hot(tokens)^T @ dx, a scatter-ADD

    # ---- layernorm -----------------------------------------------------------------------------
    def layernorm_forward(self, x, w, b):
        mean = x.mean(axis=-1)                        # (N,)
        xc = x - mean[:, None]                        # (N, d) centred
        var = (xc * xc).mean(axis=-1)                 # (N,) biased, as GPT-2
        rstd = 1.0 / np.sqrt(var + LN_EPS)            # (N,) reciprocal standard deviation
        xhat = xc * rstd[:, None]                     # (N, d) zero mean, unit variance per row
        out = xhat * w + b                            # (N, d)
        return out, mean, rstd.astype(x.dtype)

    def layernorm_backward(self, dout, x, w, mean, rstd, dskip=None):
        xhat = (x - mean[:, None]) * rstd[:, None]    # (N, d) recomputed from the forward's mean and rstd
        # forward: out = xhat * w + b
        dw = (dout * xhat).sum(axis=0)                # (d,)
        db = dout.sum(axis=0)                         # (d,)
        dxhat = dout * w                              # (N, d)
        # forward: xhat = (x - mean) * rstd, where mean and rstd depend on every x of the row. The
        # mean's path removes the row mean of dxhat, rstd's path removes its projection on xhat:
        #   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        dx = rstd[:, None] * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                              - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))  # (N, d)
        if dskip is not None:                         # x also took the skip path: both gradients add
            dx = dskip + dx
        return dx, dw, db

    # ---- RMSNorm -------------------------------------------------------------------------------
    def rmsnorm_forward(self, x, w, eps):
        rstd = 1.0 / np.sqrt((x * x).mean(axis=-1) + eps)  # (N,) no centring, unlike layernorm
        return x * rstd[:, None] * w, rstd.astype(x.dtype)  # (N, d), (N,)

    def rmsnorm_backward(self, dout, x, w, rstd, dskip=None):
        xhat = x * rstd[:, None]                      # (N, d) recomputed from the forward's rstd
        # forward: out = xhat * w
        dw = (dout * xhat).sum(axis=0)                # (d,)
        dxhat = dout * w                              # (N, d)
        # forward: xhat = x * rstd with rstd = (mean(x^2) + eps)^(-1/2), so drstd/dx_j = -rstd^3 x_j / d:
        #   dx = rstd * (dxhat - xhat * mean(dxhat * xhat))   (layernorm's formula without the mean's term)
        dx = rstd[:, None] * (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))  # (N, d)
        if dskip is not None:                         # x also took the skip path: both gradients add
            dx = dskip + dx
        return dx, dw

    def qk_norm_forward(self, qkv, wq, wk, eps, n_heads, n_kv_heads):
        N, W = qkv.shape
        hd, nq = wq.shape[0], n_heads + n_kv_heads
        heads = qkv.reshape(N, W // hd, hd)           # (N, H + 2 Hkv, hd)
        w = np.concatenate([np.broadcast_to(wq, (n_heads, hd)), np.broadcast_to(wk, (n_kv_heads, hd))])  # (H + Hkv, hd)
        out = heads.copy()                            # (N, H + 2 Hkv, hd) the value heads as they were
        qk = heads[:, :nq]                            # (N, H + Hkv, hd)
        rstd = 1.0 / np.sqrt((qk * qk).mean(axis=-1) + eps)  # (N, H + Hkv) one per head vector
        out[:, :nq] = qk * rstd[..., None] * w
        return out.reshape(N, W), rstd.astype(qkv.dtype)

    def qk_norm_backward(self, dout, qkv, wq, wk, rstd, n_heads, n_kv_heads):
        N, W = qkv.shape
        hd, nq = wq.shape[0], n_heads + n_kv_heads
        qk = qkv.reshape(N, W // hd, hd)[:, :nq]      # (N, H + Hkv, hd)
        d = dout.reshape(N, W // hd, hd)              # (N, H + 2 Hkv, hd)
        xhat = qk * rstd[..., None]                   # (N, H + Hkv, hd)
        w = np.concatenate([np.broadcast_to(wq, (n_heads, hd)), np.broadcast_to(wk, (n_kv_heads, hd))])
        # forward: out = xhat * w per head vector, wq shared by the H query heads, wk by the Hkv key heads
        dwh = (d[:, :nq] * xhat).sum(axis=0)          # (H + Hkv, hd)
        dxhat = d[:, :nq] * w                         # (N, H + Hkv, hd)
        dqkv = d.copy()                               # (N, H + 2 Hkv, hd) the value heads pass through
        # forward: xhat = x * rstd, as rmsnorm_backward, per head vector
        dqkv[:, :nq] = rstd[..., None] * (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
        return dqkv.reshape(N, W), dwh[:n_heads].sum(axis=0), dwh[n_heads:].sum(axis=0)

    # ---- rotary position embedding ----------------------------------------------------------------
    def rope_forward(self, qkv, cos, sin, positions, n_rot):
        N, W = qkv.shape
        half = cos.shape[1]                           # hd / 2
        out = qkv.copy()                              # (N, W) the value heads as they were
        heads = out.reshape(N, W // (2 * half), 2 * half)[:, :n_rot]  # (N, n_rot, hd) a view into out
        x1, x2 = heads[..., :half].copy(), heads[..., half:].copy()  # (N, n_rot, hd/2) each
        c, s = cos[positions][:, None, :], sin[positions][:, None, :]  # (N, 1, hd/2) each row's angles
        heads[..., :half] = x1 * c - x2 * s           # out1 = x1 cos - x2 sin
        heads[..., half:] = x2 * c + x1 * s           # out2 = x2 cos + x1 sin
        return out

    def rope_backward(self, dout, cos, sin, positions, n_rot):
        # forward: [out1; out2] = R(θ) [x1; x2] with R = [[cos, -sin], [sin, cos]], so dx = R(θ)^T dout
        # = R(-θ) dout: the forward's rotation with sin negated
        return self.rope_forward(dout, cos, -sin, positions, n_rot)

    # ---- linear (Conv1D layout: w is (in, out)) ------------------------------------------------
    def linear_forward(self, x, w, b):
        y = x @ w                                     # (N, out)
        if b is not None:
            y += b                                    # (N, out) the bias broadcast over rows
        return y

    def linear_backward(self, dy, x, w, need_dw=True):
        # forward: y = x @ w + b
        dx = dy @ w.T                                 # (N, in)
        dw = x.T @ dy if need_dw else None            # (in, out); None for a frozen weight
        db = dy.sum(axis=0)                           # (out,) b was added to every row
        return dx, dw, db

    # ---- LoRA: y[:, col:col+out] += scale * (x @ a) @ b ----------------------------------------
    def lora_forward(self, y, x, a, b, scale, col=0):
        u = self.lora_down_forward(x, a, scale)       # (N, r)
        y[:, col:col + b.shape[1]] += u @ b           # (N, out) a view: y changes in place
        return u

    def lora_backward(self, dy, x, u, a, b, scale, col=0):
        # undoes y[:, col:col+out] += u @ b
        dys = dy[:, col:col + b.shape[1]]             # (N, out)
        db = u.T @ dys                                # (r, out)
        dx, da = self.lora_down_backward(dys @ b.T, x, a, scale)  # du (N, r)
        return dx, da, db

    def lora_down_forward(self, x, a, scale):
        return (x @ a) * scale                        # (N, r)

    def lora_down_backward(self, du, x, a, scale):
        # undoes u = (x @ a) * scale
        dxa = du * scale                              # (N, r)
        return dxa @ a.T, x.T @ dxa                   # dx (N, in), da (in, r)

    # ---- causal self-attention over packed sequences -------------------------------------------
    # Sequence s is rows cu_seqlens[s]:cu_seqlens[s+1] of the packed batch and attends only to itself,
    # so each kernel loops over sequences and runs ordinary causal attention on each.
    @staticmethod
    def _split_heads(qkv_seq, n_heads, n_kv_heads):
        """qkv (L, W) = [q | k | v] -> q (H, L, hd), k and v (Hkv, L, hd)."""
        L, W = qkv_seq.shape
        hd = W // (n_heads + 2 * n_kv_heads)
        heads = qkv_seq.reshape(L, n_heads + 2 * n_kv_heads, hd).transpose(1, 0, 2)  # (H + 2 Hkv, L, hd)
        return heads[:n_heads], heads[n_heads:n_heads + n_kv_heads], heads[n_heads + n_kv_heads:]

    def attention_forward(self, qkv, cu_seqlens, n_heads, max_seqlen, n_kv_heads=None):
        Hkv = n_kv_heads or n_heads
        G = n_heads // Hkv                            # query heads per key/value head (1: GPT-2)
        N, W = qkv.shape
        hd = W // (n_heads + 2 * Hkv)
        scale = 1.0 / math.sqrt(hd)                   # 1/sqrt(hd): scores of unit variance
        out = np.empty((N, n_heads * hd), dtype=qkv.dtype)  # (N, H hd)
        probs = []                                    # per sequence: p (H, L, L), kept for the backward
        for s in range(len(cu_seqlens) - 1):
            a, e = cu_seqlens[s], cu_seqlens[s + 1]
            L = e - a
            q, k, v = self._split_heads(qkv[a:e], n_heads, Hkv)           # (H, L, hd), (Hkv, L, hd) x 2
            k, v = np.repeat(k, G, axis=0), np.repeat(v, G, axis=0)        # (H, L, hd) query head h reads h // G
            scores = (q @ k.transpose(0, 2, 1)) * scale                    # (H, L, L)
            masked = np.where(np.tri(L, dtype=bool), scores, -np.inf)      # (H, L, L) causal: key j <= query i
            p = softmax_forward(masked)                                    # (H, L, L) rows sum to 1
            y = p @ v                                                      # (H, L, hd)
            out[a:e] = y.transpose(1, 0, 2).reshape(L, n_heads * hd)       # (L, H hd) heads side by side
            probs.append(p.astype(qkv.dtype))
        return out, probs

    def attention_backward(self, dout, qkv, out, ctx, cu_seqlens, n_heads, max_seqlen, n_kv_heads=None):
        Hkv = n_kv_heads or n_heads
        G = n_heads // Hkv
        N, W = qkv.shape
        hd = W // (n_heads + 2 * Hkv)
        scale = 1.0 / math.sqrt(hd)
        dqkv = np.empty_like(qkv)                     # (N, W)
        for s, p in enumerate(ctx):
            a, e = cu_seqlens[s], cu_seqlens[s + 1]
            L = e - a
            q, k, v = self._split_heads(qkv[a:e], n_heads, Hkv)           # (H, L, hd), (Hkv, L, hd) x 2
            k, v = np.repeat(k, G, axis=0), np.repeat(v, G, axis=0)        # (H, L, hd)
            # forward: out[a:e] = y.transpose(1, 0, 2).reshape(L, H hd), so split dout back into heads
            dy = dout[a:e].reshape(L, n_heads, hd).transpose(1, 0, 2)      # (H, L, hd)
            # forward: y = p @ v, so dp = dy @ vT and dv = pT @ dy
            dp = dy @ v.transpose(0, 2, 1)                                 # (H, L, L)
            dv = p.transpose(0, 2, 1) @ dy                                 # (H, L, hd)
            # forward: p = softmax(masked); the masked entries have p = 0 and get no gradient, so
            # this is also the gradient of the unmasked scores
            dscores = softmax_backward(dp, p)                              # (H, L, L)
            # forward: scores = (q @ kT) * scale, so dq = dscores * scale @ k, dk = (dscores * scale)T @ q
            dqk = dscores * scale                                          # (H, L, L)
            dq = dqk @ k                                                   # (H, L, hd)
            dk = dqk.transpose(0, 2, 1) @ q                                # (H, L, hd)
            # forward: k, v = np.repeat(k, G), np.repeat(v, G): each key/value head fed G query heads,
            # so its gradient is the sum of theirs
            dk = dk.reshape(Hkv, G, L, hd).sum(axis=1)                     # (Hkv, L, hd)
            dv = dv.reshape(Hkv, G, L, hd).sum(axis=1)                     # (Hkv, L, hd)
            # forward: q, k, v = _split_heads(qkv[a:e]), so put dq, dk, dv back side by side
            dqkv[a:e] = np.concatenate([dq, dk, dv]).transpose(1, 0, 2).reshape(L, W)  # (L, W)
        return dqkv

    # ---- SwiGLU over a fused [gate | up] ---------------------------------------------------------
    def swiglu_forward(self, gu):
        f = gu.shape[1] // 2
        g, u = gu[:, :f], gu[:, f:]                   # (N, f) each
        sig = 1.0 / (1.0 + np.exp(-g))                # (N, f) sigmoid(g)
        return g * sig * u                            # (N, f) silu(g) * up

    def swiglu_backward(self, dy, gu):
        f = gu.shape[1] // 2
        g, u = gu[:, :f], gu[:, f:]                   # (N, f) each
        sig = 1.0 / (1.0 + np.exp(-g))                # (N, f)
        # forward: y = silu(g) * u with silu(g) = g sig(g), so dsilu/dg = sig + g sig (1 - sig)
        dg = dy * u * (sig + g * sig * (1.0 - sig))   # (N, f)
        du = dy * g * sig                             # (N, f)
        return np.concatenate([dg, du], axis=1).astype(gu.dtype)  # (N, 2f)

    # ---- GELU (tanh approximation) -------------------------------------------------------------
    def gelu_forward(self, x):
        # gelu(x) = 0.5 x (1 + tanh(u)), u = c (x + 0.044715 x^3), c = sqrt(2/pi)
        u = GELU_C * (x + 0.044715 * x * x * x)       # (N, 4d)
        return 0.5 * x * (1.0 + np.tanh(u))           # (N, 4d)

    def gelu_backward(self, dy, x):
        # forward: gelu = 0.5 x (1 + t), t = tanh(u), so by the product and chain rules
        #   dgelu/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx,  du/dx = c (1 + 3 * 0.044715 x^2)
        u = GELU_C * (x + 0.044715 * x * x * x)       # (N, 4d)
        t = np.tanh(u)                                # (N, 4d)
        du_dx = GELU_C * (1.0 + 3 * 0.044715 * x * x)  # (N, 4d)
        dgelu = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du_dx  # (N, 4d)
        return (dy * dgelu).astype(x.dtype)

    # ---- residual ------------------------------------------------------------------------------
    def residual_forward(self, a, b):
        return a + b

    def residual_backward(self, dy):
        # forward: y = a + b, so the gradient flows unchanged to both
        return dy, dy

    # ---- dropout -------------------------------------------------------------------------------
    def dropout_forward(self, x, p, rng):
        keep = rng.random(x.shape) >= p
        mask = (keep / (1.0 - p)).astype(x.dtype)    # (N, d): 1/(1-p) where kept, 0 where dropped
        return x * mask, mask

    def dropout_backward(self, dy, mask):
        # forward: y = x * mask
        return dy * mask

    # ---- fused output head + cross-entropy ------------------------------------------------------
    # The logits of all N rows would be an (N, V) matrix (8 x 1024 x 50257 x 4 B = 1.6 GB); a chunk of
    # rows at a time goes logits -> softmax -> loss -> dlogits -> dh, dw, and only rows with a target.
    # need_dh: dh even without dw (a frozen head); lora = (u, b, du, db): the head's adapter,
    # logits += u @ b with u = dropout(h) @ A * scale computed by the caller (lora_down_forward).
    def head_loss(self, h, w, targets, dw=None, grad_scale=1.0, need_dh=False, lora=None, dw_fresh=False):
        rows = np.flatnonzero(targets != IGNORE_INDEX)  # (M,) only these rows need logits
        if dw is not None and dw_fresh:
            dw[...] = 0.0                             # a fresh buffer: here, simply cleared first
        loss_sum = 0.0
        grad = dw is not None or need_dh
        dh = np.zeros_like(h) if grad else None       # (N, d) ignored rows get no gradient
        for c in range(0, len(rows), HEAD_CHUNK_ROWS):
            r = rows[c:c + HEAD_CHUNK_ROWS]           # (R,)
            hr = h[r]                                 # (R, d)
            t = targets[r]                            # (R,)
            at_t = (np.arange(len(r)), t)             # the target entry of each row
            logits = hr @ w.T                         # (R, V)
            if lora is not None:
                logits += lora[0][r] @ lora[1]        # (R, V) += u (R, r) @ b (r, V)
            shifted = logits - logits.max(axis=-1, keepdims=True)  # (R, V) softmax is unchanged by a shift
            lse = np.log(np.exp(shifted).sum(axis=-1))  # (R,) log-sum-exp of the shifted logits
            # loss_i = -log softmax(logits_i)[t_i] = logsumexp(logits_i) - logits_i[t_i]
            loss_sum += float((lse - shifted[at_t]).sum(dtype=np.float64))
            if not grad:
                continue
            probs = np.exp(shifted - lse[:, None])    # (R, V) softmax(logits_i)
            # forward: loss_i = logsumexp(logits_i) - logits_i[t_i], so dlogits_i = probs_i - onehot(t_i)
            dlogits = probs                           # (R, V) becomes probs - onehot, in place
            dlogits[at_t] -= 1.0
            dlogits *= grad_scale                     # the caller's 1 / n_valid (mean over targets)
            # forward: logits = hr @ wT
            dh[r] = dlogits @ w                       # (R, d)
            if dw is not None:
                dw += dlogits.T @ hr                  # (V, d) added: a tied head shares it with wte
            if lora is not None:                      # forward: logits += u @ b
                lora[2][r] = dlogits @ lora[1].T      # du (R, r)
                self.add_(lora[3], lora[0][r].T @ dlogits)  # db (r, V)
        return np.float64(loss_sum), len(rows), dh

    def head_logits(self, h, w):
        return h @ w.T                                # (N, V)

    # ---- inference: rows and the KV cache -------------------------------------------------------
    def take_rows(self, x, rows):
        return x[rows]                                # (R, ...)

    @property
    def kv_dtype(self):
        return self.np_dtype  # the store dtype: numba's bfloat16 keeps float32 activations, so its cache too

    def kv_cache_alloc(self, n_seqs, n_heads, max_len, head_dim):
        shape = (n_seqs, n_heads, max_len, head_dim)  # (S, H, T, hd)
        return np.zeros(shape, dtype=self.kv_dtype), np.zeros(shape, dtype=self.kv_dtype)

    def kv_cache_write(self, k_cache, v_cache, qkv, seq_ids, positions):
        N, W = qkv.shape
        Hkv, hd = k_cache.shape[1], k_cache.shape[3]
        heads = qkv.reshape(N, W // hd, hd)           # (N, H + 2 Hkv, hd)
        k, v = heads[:, -2 * Hkv:-Hkv], heads[:, -Hkv:]  # (N, Hkv, hd) each
        # Two index arrays around a slice: numpy puts the indexed axis first, so the target is (N, Hkv, hd).
        k_cache[seq_ids, :, positions] = k
        v_cache[seq_ids, :, positions] = v

    def attention_decode(self, qkv, k_cache, v_cache, lens, n_heads, max_len):
        S, W = qkv.shape
        Hkv, hd = k_cache.shape[1], k_cache.shape[3]
        G = n_heads // Hkv                                                 # query heads per cache head
        q = qkv[:, :n_heads * hd].reshape(S, Hkv, G, hd)                   # (S, Hkv, G, hd) grouped by cache head
        k = k_cache[:, :, :max_len]                                        # (S, Hkv, T, hd) views
        v = v_cache[:, :, :max_len]
        scores = (q @ k.transpose(0, 1, 3, 2)) / math.sqrt(hd)             # (S, Hkv, G, T)
        seen = np.arange(max_len) < lens[:, None]                          # (S, T) cache positions in use
        scores = np.where(seen[:, None, None, :], scores, -np.inf)
        scores = scores - scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)                                 # (S, Hkv, G, T)
        return (p @ v).reshape(S, n_heads * hd)                            # (S, H hd) heads side by side

    # ---- AdamW ---------------------------------------------------------------------------------
    def adamw_step(self, p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
        # The same order of operations as torch.optim.AdamW (single-tensor path):
        #   p *= 1 - lr * wd                     (decoupled weight decay)
        #   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        #   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
        p *= 1.0 - lr * weight_decay
        m *= beta1
        m += (1.0 - beta1) * g
        v *= beta2
        v += (1.0 - beta2) * g * g
        bias_c1 = 1.0 - beta1 ** step
        bias_c2_sqrt = math.sqrt(1.0 - beta2 ** step)
        denom = np.sqrt(v) / bias_c2_sqrt + eps
        p -= (lr / bias_c1) * (m / denom)

    # ---- lean AdamW state: bf16 or 8-bit moments, float32 master weights (formats: quant.py) -----
    def optim_state_zeros(self, n, kind):
        return np.zeros(n, dtype=HOST_DTYPES[kind])  # numpy holds the lean state in its checkpoint form

    def optim_state_from_numpy(self, x):
        return np.array(x)  # a copy, dtype kept: the state's bits exactly

    def optim_state_to_numpy(self, x):
        return np.array(x)

    @staticmethod
    def _adamw_f32(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
        """The fp32 AdamW step above on flat float32 views p, g and fresh float32 moments m, v:
        p is updated in place; returns the new (m, v, sqrt(v))."""
        p *= 1.0 - lr * weight_decay
        m = m * beta1 + (1.0 - beta1) * g                                    # (n,)
        v = v * beta2 + (1.0 - beta2) * g * g                                # (n,)
        root = np.sqrt(v)                                                    # (n,)
        p -= (lr / (1.0 - beta1 ** step)) * (m / (root / math.sqrt(1.0 - beta2 ** step) + eps))
        return m, v, root

    def adamw_step_bf16(self, p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, key):
        mf, vf, _ = self._adamw_f32(p.reshape(-1), g.reshape(-1), quant.bf16_to_f32(m), quant.bf16_to_f32(v),
                                    lr, beta1, beta2, eps, weight_decay, step)
        m[:] = quant.bf16_round(mf, quant.round_salt(step, key, 0))
        v[:] = quant.bf16_round(vf, quant.round_salt(step, key, 1))

    def adamw_step_8bit(self, p, g, qm, sm, qv, sv, lr, beta1, beta2, eps, weight_decay, step):
        mf = quant.dequantize(qm, sm, quant.M_CODE)                         # (n,)
        w = quant.dequantize(qv, sv, quant.V_CODE)                          # (n,) sqrt(v)
        mf, _, root = self._adamw_f32(p.reshape(-1), g.reshape(-1), mf, w * w,
                                      lr, beta1, beta2, eps, weight_decay, step)
        qm[:], sm[:] = quant.quantize(mf, quant.M_CODE, quant.M_MID)
        qv[:], sv[:] = quant.quantize(root, quant.V_CODE, quant.V_MID)

    def global_norm(self, grads):
        return float(np.sqrt(sum(float(np.dot(g.ravel(), g.ravel())) for g in grads)))

    def scale_(self, grads, s):
        for g in grads:
            g *= s
