"""The reference backend: plain numpy, written to be read. Every other backend is tested against it.

Each kernel's forward sits beside its backward. Shapes: N positions, d width, H heads, hd = d // H,
V vocabulary, L one sequence's length. The math is in a comment wherever it is not obvious.
"""
import math

import numpy as np

from . import quant

# Python floats, not numpy float64 scalars: numpy keeps float32 arrays float32 only under weak scalars.
GELU_C = math.sqrt(2.0 / math.pi)  # tanh-GELU constant
LN_EPS = 1e-5
# The lean optimizer state's arrays: bfloat16 moments as their uint16 bit patterns, 8-bit codes, block scales.
LEAN_DTYPES = {"bf16": np.uint16, "u8": np.uint8, "scale": np.float32}
HEAD_CHUNK_ROWS = 256  # rows of logits materialised at once in the fused head: 256 x 50257 x 4 B = 51 MB


class NumpyBackend:
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
        return np.zeros(x.shape, dtype=x.dtype)  # calloc, unlike np.zeros_like: untouched pages cost nothing

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

    # ---- layernorm -----------------------------------------------------------------------------
    def layernorm_forward(self, x, w, b):
        mean = x.mean(axis=-1)                        # (N,)
        xc = x - mean[:, None]                        # (N, d)
        var = (xc * xc).mean(axis=-1)                 # (N,) biased, as GPT-2
        rstd = 1.0 / np.sqrt(var + LN_EPS)            # (N,)
        out = xc * rstd[:, None] * w + b              # (N, d)
        return out, mean, rstd.astype(x.dtype)

    def layernorm_backward(self, dout, x, w, mean, rstd):
        # With xhat = (x - mean) * rstd and dxhat = dout * w:
        #   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        xhat = (x - mean[:, None]) * rstd[:, None]    # (N, d)
        dxhat = dout * w                              # (N, d)
        dx = rstd[:, None] * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                              - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))  # (N, d)
        dw = (dout * xhat).sum(axis=0)                # (d,)
        db = dout.sum(axis=0)                         # (d,)
        return dx, dw, db

    # ---- linear (Conv1D layout: w is (in, out)) ------------------------------------------------
    def linear_forward(self, x, w, b):
        y = x @ w                                     # (N, out)
        if b is not None:
            y += b
        return y

    def linear_backward(self, dy, x, w, need_dw=True):
        dx = dy @ w.T                                 # (N, in)
        dw = x.T @ dy if need_dw else None            # (in, out)
        db = dy.sum(axis=0)                           # (out,)
        return dx, dw, db

    # ---- causal self-attention over packed sequences -------------------------------------------
    @staticmethod
    def _split_heads(qkv_seq, n_heads):
        """qkv (L, 3d) -> q, k, v each (H, L, hd)."""
        L, three_d = qkv_seq.shape
        hd = three_d // 3 // n_heads
        return qkv_seq.reshape(L, 3, n_heads, hd).transpose(1, 2, 0, 3)

    def attention_forward(self, qkv, cu_seqlens, n_heads, max_seqlen):
        N, three_d = qkv.shape
        d = three_d // 3
        scale = 1.0 / math.sqrt(d // n_heads)
        out = np.empty((N, d), dtype=qkv.dtype)       # (N, d)
        probs = []                                    # per sequence: (H, L, L), kept for the backward
        for s in range(len(cu_seqlens) - 1):
            a, e = cu_seqlens[s], cu_seqlens[s + 1]
            L = e - a
            q, k, v = self._split_heads(qkv[a:e], n_heads)                 # (H, L, hd) each
            scores = (q @ k.transpose(0, 2, 1)) * scale                    # (H, L, L)
            scores = np.where(np.tri(L, dtype=bool), scores, -np.inf)      # causal: key j <= query i
            scores = scores - scores.max(axis=-1, keepdims=True)
            p = np.exp(scores)
            p /= p.sum(axis=-1, keepdims=True)                             # (H, L, L) softmax rows
            y = p @ v                                                      # (H, L, hd)
            out[a:e] = y.transpose(1, 0, 2).reshape(L, d)                  # heads side by side
            probs.append(p.astype(qkv.dtype))
        return out, probs

    def attention_backward(self, dout, qkv, out, ctx, cu_seqlens, n_heads, max_seqlen):
        N, three_d = qkv.shape
        d = three_d // 3
        hd = d // n_heads
        scale = 1.0 / math.sqrt(hd)
        dqkv = np.empty_like(qkv)                     # (N, 3d)
        for s, p in enumerate(ctx):
            a, e = cu_seqlens[s], cu_seqlens[s + 1]
            L = e - a
            q, k, v = self._split_heads(qkv[a:e], n_heads)                 # (H, L, hd) each
            dy = dout[a:e].reshape(L, n_heads, hd).transpose(1, 0, 2)      # (H, L, hd)
            dv = p.transpose(0, 2, 1) @ dy                                 # (H, L, hd)
            dp = dy @ v.transpose(0, 2, 1)                                 # (H, L, L)
            # softmax backward, row by row: dscores = p * (dp - sum_j(dp * p)); masked entries have
            # p = 0 and so get no gradient.
            dscores = p * (dp - (dp * p).sum(axis=-1, keepdims=True)) * scale  # (H, L, L)
            dq = dscores @ k                                               # (H, L, hd)
            dk = dscores.transpose(0, 2, 1) @ q                            # (H, L, hd)
            dqkv[a:e] = np.stack([dq, dk, dv]).transpose(2, 0, 1, 3).reshape(L, three_d)
        return dqkv

    # ---- GELU (tanh approximation) -------------------------------------------------------------
    def gelu_forward(self, x):
        # gelu(x) = 0.5 x (1 + tanh(c (x + 0.044715 x^3))), c = sqrt(2/pi)
        return 0.5 * x * (1.0 + np.tanh(GELU_C * (x + 0.044715 * x * x * x)))

    def gelu_backward(self, dy, x):
        # d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 * 0.044715 x^2), t = tanh(c (x + 0.044715 x^3))
        t = np.tanh(GELU_C * (x + 0.044715 * x * x * x))  # x * x * x: float32 x ** 3 is a slow pow
        dgelu = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3 * 0.044715 * x * x)
        return (dy * dgelu).astype(x.dtype)

    # ---- residual ------------------------------------------------------------------------------
    def residual_forward(self, a, b):
        return a + b

    def residual_backward(self, dy):
        return dy, dy

    # ---- dropout -------------------------------------------------------------------------------
    def dropout_forward(self, x, p, rng):
        keep = rng.random(x.shape) >= p
        mask = (keep / (1.0 - p)).astype(x.dtype)    # (N, d): 1/(1-p) where kept, 0 where dropped
        return x * mask, mask

    def dropout_backward(self, dy, mask):
        return dy * mask

    # ---- fused output head + cross-entropy ------------------------------------------------------
    def head_loss(self, h, w, targets, dw=None, grad_scale=1.0):
        rows = np.flatnonzero(targets != -100)        # (M,) only these rows need logits
        loss_sum = 0.0
        dh = np.zeros_like(h) if dw is not None else None  # (N, d)
        for c in range(0, len(rows), HEAD_CHUNK_ROWS):
            r = rows[c:c + HEAD_CHUNK_ROWS]           # (R,)
            hr = h[r]                                 # (R, d)
            logits = hr @ w.T                         # (R, V)
            logits -= logits.max(axis=-1, keepdims=True)
            lse = np.log(np.exp(logits).sum(axis=-1))  # (R,) log-sum-exp of shifted logits
            t = targets[r]                            # (R,)
            # loss_i = logsumexp(logits_i) - logits_i[t_i]
            loss_sum += float((lse - logits[np.arange(len(r)), t]).sum(dtype=np.float64))
            if dw is None:
                continue
            # d loss_i / d logits_i = softmax(logits_i) - onehot(t_i)
            dlogits = np.exp(logits - lse[:, None])   # (R, V), reuses the chunk's logits memory
            dlogits[np.arange(len(r)), t] -= 1.0
            dlogits *= grad_scale
            dh[r] = dlogits @ w                       # (R, d)
            dw += dlogits.T @ hr                      # (V, d)
        return np.float64(loss_sum), len(rows), dh

    def head_logits(self, h, w):
        return h @ w.T                                # (N, V)

    # ---- inference: rows and the KV cache -------------------------------------------------------
    def take_rows(self, x, rows):
        return x[rows]                                # (R, ...)

    def kv_cache_alloc(self, n_seqs, n_heads, max_len, head_dim):
        shape = (n_seqs, n_heads, max_len, head_dim)  # (S, H, T, hd)
        return np.zeros(shape, dtype=self.np_dtype), np.zeros(shape, dtype=self.np_dtype)

    def kv_cache_write(self, k_cache, v_cache, qkv, seq_ids, positions):
        N, three_d = qkv.shape
        H, hd = k_cache.shape[1], k_cache.shape[3]
        _, k, v = qkv.reshape(N, 3, H, hd).transpose(1, 0, 2, 3)          # (N, H, hd) each
        # Two index arrays around a slice: numpy puts the indexed axis first, so the target is (N, H, hd).
        k_cache[seq_ids, :, positions] = k
        v_cache[seq_ids, :, positions] = v

    def attention_decode(self, qkv, k_cache, v_cache, lens, n_heads, max_len):
        S, three_d = qkv.shape
        d = three_d // 3
        hd = d // n_heads
        q = qkv[:, :d].reshape(S, n_heads, 1, hd)                          # (S, H, 1, hd)
        k = k_cache[:, :, :max_len]                                        # (S, H, T, hd) views
        v = v_cache[:, :, :max_len]
        scores = (q @ k.transpose(0, 1, 3, 2)) / math.sqrt(hd)             # (S, H, 1, T)
        seen = np.arange(max_len) < lens[:, None]                          # (S, T) cache positions in use
        scores = np.where(seen[:, None, None, :], scores, -np.inf)
        scores = scores - scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)                                 # (S, H, 1, T)
        return (p @ v).reshape(S, d)                                       # (S, d) heads side by side

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
        return np.zeros(n, dtype=LEAN_DTYPES[kind])

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
