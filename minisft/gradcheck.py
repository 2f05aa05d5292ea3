"""Analytic gradients against central finite differences, in float64: the one checker that
`minisft study` runs and the tests assert with.

The five-point stencil f'(x) ~ (f(x-2h) - 8 f(x-h) + 8 f(x+h) - f(x+2h)) / 12h has truncation error
~ h^4 |f(5)| / 30 and round-off ~ 1e-16 |f| / h: with h = 1e-4 both stay far below FD_TOL, even on a
strongly curved function (the whole model's loss) and a large one (the 600-row head loss, |f| ~ 300).
"""
from typing import Callable

import numpy as np

FD_EPS = 1e-4       # the step h
FD_TOL = 1e-7       # the norm-relative error a correct backward stays under
FD_SAMPLES = 24     # entries perturbed per array when it has more (all of them otherwise)


def rel_error(got, ref) -> float:
    """||got - ref|| / ||ref|| over every array of got and ref (an array or a list of arrays);
    the absolute error where ref is all zeros."""
    got, ref = (got, ref) if isinstance(ref, list) else ([got], [ref])
    diff = np.sqrt(sum(float(np.sum((np.asarray(g) - np.asarray(r)) ** 2)) for g, r in zip(got, ref)))
    norm = np.sqrt(sum(float(np.sum(np.asarray(r) ** 2)) for r in ref))
    return float(diff / norm if norm > 0 else diff)


def fd_error(f: Callable[[], float], x, grad, rng: np.random.Generator, eps: float = FD_EPS,
             samples: int = FD_SAMPLES) -> float:
    """Norm-relative error of grad, the analytic gradient of the scalar f() with respect to x (an
    array, or a list of arrays with grad alike), against five-point central differences at up to
    `samples` entries of each array, drawn from rng. f reads x: each entry is perturbed in place and
    restored."""
    xs, gs = (x, grad) if isinstance(x, list) else ([x], [grad])
    num, ana = [], []
    for part, g in zip(xs, gs):
        picks = range(part.size) if part.size <= samples else rng.choice(part.size, samples, replace=False)
        for j in picks:
            idx = np.unravel_index(j, part.shape)
            old = part[idx]
            at = []
            for step in (-2, -1, 1, 2):
                part[idx] = old + step * eps
                at.append(f())
            part[idx] = old
            num.append((at[0] - 8 * at[1] + 8 * at[2] - at[3]) / (12 * eps))
            ana.append(np.reshape(g, -1)[j])
    return rel_error(np.array(num), np.array(ana))
