# ruff: noqa: F401, F841, B007  (until its blanks are filled, some names are read by no line)
"""Exercise 1: the backward of GPT-2's tanh-GELU (docs/backprop.md, "[8] fch_gelu = gelu(fch)").

Fill every `...` marked TODO, then check it stage by stage against finite differences:

    minisft study gelu --kernel docs/exercises/1_gelu.py:gelu_backward

The arguments are the numpy backend's gelu_backward's (without self): dy, the gradient of the output,
and x, the forward's input. Return dx, of x's shape.
"""
import numpy as np

GELU_C = float(np.sqrt(2.0 / np.pi))  # c = sqrt(2/pi)


def gelu_backward(dy, x):
    # forward: gelu = 0.5 x (1 + t), t = tanh(u), u = c (x + 0.044715 x^3)
    u = GELU_C * (x + 0.044715 * x * x * x)       # (N, 4d)
    t = np.tanh(u)                                # (N, 4d)
    du_dx = ...  # TODO: du/dx, (N, 4d)
    dgelu = ...  # TODO: dgelu/dx by the product rule: x is read twice, directly and through t, (N, 4d)
    return (dy * dgelu).astype(x.dtype)
