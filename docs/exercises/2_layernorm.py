# ruff: noqa: F401, F841, B007  (until its blanks are filled, some names are read by no line)
"""Exercise 2: the backward of layernorm (docs/backprop.md, "[6] ln2 = layernorm(x2)").

Fill every `...` marked TODO, then check it:

    minisft study layernorm --kernel docs/exercises/2_layernorm.py:layernorm_backward

A wrong dx is reported with the stage term it lacks, when it lacks one (`minisft study layernorm`
prints the six stages: mean, xc, var, rstd, xhat, out). The arguments are the numpy backend's
layernorm_backward's (without self): dout (N, d); x (N, d), the forward's input; w (d,), the gain;
mean and rstd (N,), saved by the forward; dskip, a gradient to add into dx, or None.
Return dx (N, d), dw (d,), db (d,).
"""


def layernorm_backward(dout, x, w, mean, rstd, dskip=None):
    xhat = (x - mean[:, None]) * rstd[:, None]    # (N, d) recomputed from the forward's mean and rstd
    # forward: out = xhat * w + b
    dw = ...  # TODO: (d,)
    db = ...  # TODO: (d,)
    dxhat = ...  # TODO: (N, d)
    # forward: xhat = (x - mean) * rstd, where mean and rstd depend on every x of the row
    dx = ...  # TODO: (N, d), the mean's path and rstd's path included
    if dskip is not None:                         # x also took the skip path: both gradients add
        dx = dskip + dx
    return dx, dw, db
