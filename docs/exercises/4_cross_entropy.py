# ruff: noqa: F401, F841, B007  (until its blanks are filled, some names are read by no line)
"""Exercise 4: the output head and cross-entropy, fused (docs/backprop.md, "Head + cross-entropy").

Fill every `...` marked TODO, then check it:

    minisft study cross-entropy --kernel docs/exercises/4_cross_entropy.py:head_loss

The arguments are the numpy backend's head_loss's (without self): h (N, d), the final layernorm's
output; w (V, d), the head; targets (N,), -100 where a position has none; dw, a (V, d) buffer to ADD
the head's gradient into (None: no gradient); grad_scale, what every dlogits is multiplied by (1/M for
the mean over M targets); need_dh, lora and dw_fresh as the reference's (this exercise leaves LoRA out).
Return (the summed loss, M, dh (N, d) or None).
"""
import numpy as np

IGNORE_INDEX = -100
CHUNK_ROWS = 256  # rows of logits held at once: never the whole (N, V)


def head_loss(h, w, targets, dw=None, grad_scale=1.0, need_dh=False, lora=None, dw_fresh=False):
    if lora is not None:
        raise NotImplementedError("this exercise leaves the head's LoRA adapter out")
    rows = np.flatnonzero(targets != IGNORE_INDEX)  # (M,) only these rows need logits
    if dw is not None and dw_fresh:
        dw[...] = 0.0
    loss_sum = 0.0
    grad = dw is not None or need_dh
    dh = np.zeros_like(h) if grad else None       # (N, d) ignored rows get no gradient
    for c in range(0, len(rows), CHUNK_ROWS):
        r = rows[c:c + CHUNK_ROWS]                # (R,)
        hr = h[r]                                 # (R, d)
        t = targets[r]                            # (R,)
        at_t = (np.arange(len(r)), t)             # the target entry of each row
        logits = hr @ w.T                         # (R, V)
        shifted = logits - logits.max(axis=-1, keepdims=True)  # (R, V) softmax is unchanged by a shift
        lse = ...  # TODO: (R,) log-sum-exp of the shifted logits
        # loss_i = -log softmax(logits_i)[t_i] = logsumexp(logits_i) - logits_i[t_i]
        loss_sum += float((lse - shifted[at_t]).sum(dtype=np.float64))
        if not grad:
            continue
        probs = ...  # TODO: (R, V) softmax(logits_i)
        dlogits = probs                           # (R, V) becomes probs - onehot, in place
        dlogits[at_t] -= ...  # TODO: the one-hot of the targets
        dlogits *= grad_scale                     # the caller's 1 / M (mean over targets)
        # forward: logits = hr @ wT
        dh[r] = ...  # TODO: (R, d)
        if dw is not None:
            dw += ...  # TODO: (V, d), added: a tied head shares it with wte
    return np.float64(loss_sum), len(rows), dh
