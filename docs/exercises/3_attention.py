# ruff: noqa: F401, F841, B007  (until its blanks are filled, some names are read by no line)
"""Exercise 3: the backward of causal self-attention over packed sequences (docs/backprop.md,
"[3] atty = attention(qkv)").

Fill every `...` marked TODO, then check it:

    minisft study attention --kernel docs/exercises/3_attention.py:attention_backward

A wrong dqkv is reported head by head for q, k and v. The arguments are the numpy backend's
attention_backward's (without self): dout (N, H hd); qkv (N, (H + 2 Hkv) hd), the forward's input;
out, its output; ctx, the softmax probabilities p (H, L, L) of each sequence, saved by the forward;
cu_seqlens (S+1,), where each sequence starts; n_heads H; max_seqlen; n_kv_heads (None: H).
Return dqkv, of qkv's shape.
"""
import math

import numpy as np

from minisft.backends.numpy_backend import NumpyBackend, softmax_backward

_split_heads = NumpyBackend._split_heads  # qkv (L, W) -> q (H, L, hd), k and v (Hkv, L, hd)


def attention_backward(dout, qkv, out, ctx, cu_seqlens, n_heads, max_seqlen, n_kv_heads=None):
    Hkv = n_kv_heads or n_heads
    G = n_heads // Hkv
    N, W = qkv.shape
    hd = W // (n_heads + 2 * Hkv)
    scale = 1.0 / math.sqrt(hd)
    dqkv = np.empty_like(qkv)                     # (N, W)
    for s, p in enumerate(ctx):
        a, e = cu_seqlens[s], cu_seqlens[s + 1]
        L = e - a
        q, k, v = _split_heads(qkv[a:e], n_heads, Hkv)                     # (H, L, hd), (Hkv, L, hd) x 2
        k, v = np.repeat(k, G, axis=0), np.repeat(v, G, axis=0)            # (H, L, hd)
        # forward: out[a:e] = y.transpose(1, 0, 2).reshape(L, H hd), so split dout back into heads
        dy = dout[a:e].reshape(L, n_heads, hd).transpose(1, 0, 2)          # (H, L, hd)
        # forward: y = p @ v
        dp = ...  # TODO: (H, L, L)
        dv = ...  # TODO: (H, L, hd)
        # forward: p = softmax(masked scores), row by row
        dscores = ...  # TODO: (H, L, L)
        # forward: scores = (q @ kT) * scale
        dqk = dscores * scale                                              # (H, L, L)
        dq = ...  # TODO: (H, L, hd)
        dk = ...  # TODO: (H, L, hd)
        # forward: k, v = np.repeat(k, G), np.repeat(v, G): each key/value head fed G query heads
        dk = dk.reshape(Hkv, G, L, hd).sum(axis=1)                         # (Hkv, L, hd)
        dv = dv.reshape(Hkv, G, L, hd).sum(axis=1)                         # (Hkv, L, hd)
        # forward: q, k, v = _split_heads(qkv[a:e]), so put dq, dk, dv back side by side
        dqkv[a:e] = np.concatenate([dq, dk, dv]).transpose(1, 0, 2).reshape(L, W)  # (L, W)
    return dqkv
