"""Backprop through GPT-2 and the Llama family, one stage at a time, on tiny float64 inputs
(`minisft study OP`).

An op is a chain of stages, each one line of math: `out = f(inputs)` forward, and the backward that
undoes it, `d(inputs) = g(dout)`. A study runs the forward stage by stage, draws a random gradient for
the final output, walks the stages in reverse, and checks every stage's backward against central
finite differences of its own forward (with the gradient that actually reached it). Then it checks
the numpy backend's kernel itself: its output and gradients against the stages', and against finite
differences. Every check is norm-relative, in float64.

Values are numpy arrays, or lists of arrays, one per packed sequence (attention works on each
sequence alone, so its per-head intermediates have a different length L per sequence).

`--kernel FILE:FUNCTION` runs the learner's own backward wherever the study runs the numpy kernel of
that name (the exercises in docs/exercises/ hand them out with lines blanked). `adamw` walks the
update itself against torch.optim.AdamW; `step` a whole training step (forward, backward, AdamW)
against the PyTorch-autograd peer.
"""
import copy
import importlib.util
import inspect
import math
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import block, family, gradcheck, llama
from .backends import numpy_backend as nb
from .backends.constants import LN_EPS
from .batch import IGNORE_INDEX, PackedBatch
from .config import GPTConfig
from .errors import MinisftError
from .gradcheck import FD_EPS, FD_SAMPLES, FD_TOL, rel_error

SAME_TOL = 1e-12    # the kernel against the stages: the same math in float64, only reordered
TORCH_TOL = 1e-10   # ours against PyTorch autograd (its own ops, its own order of operations)
DIAGNOSE_TOL = 1e-9  # a kernel gradient this close to a stage-built candidate (scaled, a term cut) is that one
EVERY_ENTRY = 1 << 30  # fd_error's samples: every entry of a stage's inputs (a study's arrays are tiny)
PRINT_WHOLE = 48    # arrays of up to this many entries are printed whole, bigger ones summarised
VOCAB = 11          # the tiny vocabulary of the cross-entropy and model studies
D_OUT = 4           # the tiny linear layer's output width
MODEL_LAYERS = 2    # blocks in the model study: one block's output feeds another
LLAMA_OPS = ("rmsnorm", "rope", "swiglu", "gqa", "qk_norm", "llama-block")  # their defaults: LLAMA_SHAPE
GROUPED_OPS = ("rope", "gqa", "qk_norm", "llama-block")  # the ops with key/value heads apart from the query heads
GPT2_SHAPE = (2, 3)         # heads, head_dim
LLAMA_SHAPE = (4, 4)        # hd = 4: two pairs, split in halves (at 2 an interleaved split is the same)
KV_HEADS = 2                # the grouped ops' default: two groups of two query heads
LLAMA_FFN = 2       # the Llama block study's MLP width f, in units of d
ROPE_THETA = 100.0  # small, so that both of a 4-wide head's pairs turn visibly within a few positions
RMS_EPS = llama.LlamaConfig.rms_eps  # the family's default


@dataclass
class Stage:
    out: str                # the value it makes
    ins: tuple              # the values it reads (all differentiable; indices are closed over)
    forward: str            # its math, as printed
    backward: str           # the backward that undoes it, as printed
    f: Callable             # f(*ins) -> out
    df: Callable            # df(dout, out, *ins) -> one gradient per input


@dataclass
class Kernel:
    """The backend code the stages spell out: f(values) -> output, df(dout, values) -> {leaf: grad}."""
    name: str
    f: Callable
    df: Callable
    separate: bool = True   # separate code from the stages (False: the stages chained, end to end)
    parts: Callable = None  # parts(got, ref) -> {label: (got part, ref part)}: a fused gradient, piece by piece


@dataclass
class Check:
    what: str
    err: float
    tol: float

    @property
    def ok(self) -> bool:
        return bool(self.err <= self.tol)  # a NaN error fails


# ---- values: an array or a list of per-sequence arrays ----------------------------------------------
def _parts(v):
    return v if isinstance(v, list) else [v]


def _shape(v) -> str:
    return " | ".join(str(p.shape) for p in _parts(v))


def _dot(a, b) -> float:
    return sum(float(np.sum(x * y)) for x, y in zip(_parts(a), _parts(b)))


def _add(a, b):
    return [x + y for x, y in zip(a, b)] if isinstance(a, list) else a + b


def _scale(v, c):
    return [x * c for x in v] if isinstance(v, list) else v * c


def _copy(v):
    return [np.array(p) for p in v] if isinstance(v, list) else np.array(v)


def fd_error(f, args, i, grad, dout, rng, samples=FD_SAMPLES) -> float:
    """Norm-relative error of grad, the analytic gradient of dot(dout, f(*args)) with respect to args[i],
    against central differences (gradcheck.fd_error) at up to samples entries of each part of args[i]."""
    args = [_copy(a) for a in args]
    return gradcheck.fd_error(lambda: _dot(dout, f(*args)), args[i], grad, rng, samples=samples)


# ---- running a chain ------------------------------------------------------------------------------
@dataclass
class Study:
    op: str
    title: str
    leaves: dict            # inputs and parameters: name -> value
    stages: list
    kernel: Kernel
    dout: object            # the random gradient of the final output (1 for a scalar loss)
    values: dict = None     # every value, forward
    grads: dict = None      # every value's gradient, backward
    local: dict = None      # stage out -> the gradients its backward returned, one per input
    adds: set = None        # (stage out, input) where the input already had a gradient: the two add
    kgrads: dict = None     # the kernel's gradient of every leaf
    checks: list = None
    meta: dict = None       # what the PyTorch side needs: cu_seqlens, heads, targets, ...


def _backprop(stages, values, dout, cut=None):
    """The stages' backward from dout: (grads, local, adds). grads: every value's gradient; local: stage
    out -> the gradients its backward returned, one per input; adds: (stage out, input) where the input
    already had a gradient, so the two add. cut = (stage out, input index): that term is left out (the
    backward a learner gets by forgetting it)."""
    grads, local, adds = {stages[-1].out: dout}, {}, set()
    for st in reversed(stages):
        gs = st.df(grads[st.out], values[st.out], *[values[n] for n in st.ins])
        local[st.out] = gs
        for i, (n, g) in enumerate(zip(st.ins, gs)):
            if cut == (st.out, i):
                g = _scale(g, 0.0)
            if n in grads:  # a value read by two stages: its gradients add
                adds.add((st.out, n))
                grads[n] = _add(grads[n], g)
            else:
                grads[n] = g
    return grads, local, adds


def _forward(stages, leaves) -> dict:
    values = dict(leaves)
    for st in stages:
        values[st.out] = st.f(*[values[n] for n in st.ins])
    return values


def run_study(s: Study, rng) -> Study:
    s.values = _forward(s.stages, s.leaves)
    s.grads, s.local, s.adds = _backprop(s.stages, s.values, s.dout)
    s.checks = []
    for st in reversed(s.stages):  # backward order: the first failing check is where a wrong gradient starts
        ins = [s.values[n] for n in st.ins]
        for i, n in enumerate(st.ins):
            # every entry: a wrong row (a repeated token's, a masked position's) cannot hide between samples
            s.checks.append(Check(f"{st.out}: d{n}", fd_error(st.f, ins, i, s.local[st.out][i], s.grads[st.out],
                                                               rng, EVERY_ENTRY), FD_TOL))
    k = s.kernel
    s.kgrads = k.df(s.dout, s.leaves)
    names = list(s.leaves)
    if k.separate:
        s.checks.append(Check(f"{k.name} forward = stages", rel_error(k.f(s.leaves), s.values[s.stages[-1].out]),
                              SAME_TOL))
        for n in names:
            s.checks.append(Check(f"{k.name} backward = stages: d{n}", rel_error(s.kgrads[n], s.grads[n]), SAME_TOL))
    leaf_args = [s.leaves[n] for n in names]

    def kernel_f(*args):
        return k.f(dict(zip(names, args)))
    for i, n in enumerate(names):
        s.checks.append(Check(f"{k.name} backward vs finite differences: d{n}",
                              fd_error(kernel_f, leaf_args, i, s.kgrads[n], s.dout, rng), FD_TOL))
    return s


# ---- where a wrong kernel gradient sits -------------------------------------------------------------
def _ratio(got, ref):
    """c with got = c * ref when got is a multiple of ref (to 1e-9), else None."""
    rr = _dot(ref, ref)
    c = _dot(got, ref) / rr if rr > 0 else 0.0
    return c if rr > 0 and rel_error(got, _scale(ref, c)) <= DIAGNOSE_TOL else None


def localise(s: Study) -> list:
    """Lines saying where the kernel's gradient departs from the stages': per part (attention: each head
    of q, k and v), a scale when it is a multiple of the right one, and the stage terms whose omission
    gives exactly the kernel's gradient. Empty when the kernel agrees with the stages."""
    wrong = [n for n in s.leaves if rel_error(s.kgrads[n], s.grads[n]) > FD_TOL]
    if not s.kernel.separate or not wrong:
        return []
    lines = []
    parts = s.kernel.parts
    for n in wrong:
        pieces = parts(s.kgrads[n], s.grads[n]) if parts else {f"d{n}": (s.kgrads[n], s.grads[n])}
        for label, (got, ref) in pieces.items():
            err = rel_error(got, ref)
            c = _ratio(got, ref) if err > FD_TOL else None
            scale = f"  ({c:.6g} times the right one: a wrong scale)" if c is not None else ""
            mark = "ok" if err <= FD_TOL else "FAILED"
            lines.append(f"  {label:<14} kernel vs stages: error {err:.1e} {mark}{scale}")
    for st in reversed(s.stages):
        for i, n in enumerate(st.ins):
            cut = _backprop(s.stages, s.values, s.dout, cut=(st.out, i))[0]
            if all(rel_error(s.kgrads[m], cut[m]) <= DIAGNOSE_TOL for m in s.leaves):
                lines.append(f"  the kernel's gradient is the stages' without stage {st.out}'s term into d{n}: "
                             f"{st.backward}")
    return lines


def first_failure(s: Study):
    """The first failing check in backward order (stages from the output down, then the kernel, then
    autograd), or None."""
    return next((c for c in s.checks if not c.ok), None)


# ---- the studies ----------------------------------------------------------------------------------
def _cu(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (S+1,)


def _positions(lengths):
    return np.concatenate([np.arange(L) for L in lengths])  # (N,) 0, 1, ... restarting at every sequence


def _attention_stages(lengths, H, Hkv, hd) -> list:
    """Packed causal attention of H query heads over Hkv key/value heads (H = Hkv: GPT-2's), as
    stages. With groups (G = H / Hkv > 1), k and v are repeated G times before the scores, as the
    kernel does: the repeat is a stage of its own, whose backward sums each group."""
    cu, G = _cu(lengths), H // Hkv
    scale = 1.0 / math.sqrt(hd)
    spans = [(int(a), int(e)) for a, e in zip(cu[:-1], cu[1:])]
    grouped = G > 1
    # the q, k, v column blocks of qkv, in units of heads, and how the printed formulas name them
    blocks = {"q": (0, H), "k": (H, H + Hkv), "v": (H + Hkv, H + 2 * Hkv)}
    cols = ({"q": ":H hd", "k": "H hd:(H+Hkv) hd", "v": "(H+Hkv) hd:"} if grouped else
            {"q": ":d", "k": "d:2d", "v": "2d:"})

    def head(name):
        a_h, e_h = blocks[name]
        c0, c1, n = a_h * hd, e_h * hd, e_h - a_h

        def f(qkv):
            return [qkv[a:e, c0:c1].reshape(e - a, n, hd).transpose(1, 0, 2).copy() for a, e in spans]  # (n, L, hd)

        def df(dh, out, qkv):
            dqkv = np.zeros_like(qkv)                                             # (N, W)
            for (a, e), g in zip(spans, dh):
                dqkv[a:e, c0:c1] = g.transpose(1, 0, 2).reshape(e - a, n * hd)
            return (dqkv,)
        heads = "Hkv heads" if grouped and name != "q" else "H heads"
        return Stage(name, ("qkv",), f"{name} = qkv[:, {cols[name]}] split into {heads}, per sequence",
                     f"dqkv[:, {cols[name]}] = d{name} with the heads side by side again", f, df)

    def repeat(name):  # kr, vr (H, L, hd): query head h reads key/value head h // G
        def f(kv):
            return [np.repeat(x, G, axis=0) for x in kv]

        def df(dr, out, kv):  # each key/value head fed the G query heads of its group: their gradients add
            return ([g.reshape(Hkv, G, *g.shape[1:]).sum(axis=1) for g in dr],)  # (Hkv, L, hd)
        return Stage(name + "r", (name,), f"{name}r = {name} with each head repeated G = {G} times: query head h "
                     f"reads {name} head h // G", f"d{name}[j] = sum_g d{name}r[j G + g], g < G: the sum over "
                     f"head j's group of {G} query heads", f, df)
    kn, vn = ("kr", "vr") if grouped else ("k", "v")  # what the scores and y read

    def scores_f(q, k):
        return [(qs @ ks.transpose(0, 2, 1)) * scale for qs, ks in zip(q, k)]   # (H, L, L)

    def scores_df(dscores, out, q, k):
        dqk = [g * scale for g in dscores]                                         # (H, L, L)
        return [g @ ks for g, ks in zip(dqk, k)], [g.transpose(0, 2, 1) @ qs for g, qs in zip(dqk, q)]

    def p_f(scores):
        return [nb.softmax_forward(np.where(np.tri(s.shape[-1], dtype=bool), s, -np.inf)) for s in scores]

    def p_df(dp, p, scores):
        return ([nb.softmax_backward(g, ps) for g, ps in zip(dp, p)],)

    def y_f(p, v):
        return [ps @ vs for ps, vs in zip(p, v)]                                   # (H, L, hd)

    def y_df(dy, y, p, v):
        return ([g @ vs.transpose(0, 2, 1) for g, vs in zip(dy, v)],              # dp (H, L, L)
                [ps.transpose(0, 2, 1) @ g for ps, g in zip(p, dy)])              # dv (H, L, hd)

    def out_f(y):
        return np.concatenate([ys.transpose(1, 0, 2).reshape(-1, H * hd) for ys in y])  # (N, H hd)

    def out_df(dout, out, y):
        return ([dout[a:e].reshape(e - a, H, hd).transpose(1, 0, 2) for a, e in spans],)

    return [
        head("q"), head("k"), head("v"), *([repeat("k"), repeat("v")] if grouped else []),
        Stage("scores", ("q", kn), f"scores = q @ {kn}T / sqrt(hd)",
              f"dq = dscores @ {kn} / sqrt(hd);  d{kn} = dscoresT @ q / sqrt(hd)", scores_f, scores_df),
        Stage("p", ("scores",), "p = softmax(scores with key j > query i set to -inf), row by row",
              "dscores = p * (dp - sum_j(dp * p))   (masked entries: p = 0, no gradient)", p_f, p_df),
        Stage("y", ("p", vn), f"y = p @ {vn}", f"dp = dy @ {vn}T;  d{vn} = pT @ dy", y_f, y_df),
        Stage("out", ("y",), "out = y with the heads side by side, the sequences back to back",
              "dy = dout split into heads, per sequence", out_f, out_df),
    ]


def _attention_kernel(B, lengths, H, Hkv) -> Kernel:
    cu, L_max = _cu(lengths), max(lengths)

    def f(v):
        return B.attention_forward(v["qkv"], cu, H, L_max, Hkv)[0]

    def df(g, v):
        y, ctx = B.attention_forward(v["qkv"], cu, H, L_max, Hkv)
        return {"qkv": B.attention_backward(g, v["qkv"], y, ctx, cu, H, L_max, Hkv)}

    def parts(got, ref):  # dqkv (N, (H + 2 Hkv) hd): each head of dq, dk and dv on its own
        hd = got.shape[1] // (H + 2 * Hkv)
        heads = [("q", h) for h in range(H)] + [(x, h) for x in "kv" for h in range(Hkv)]
        return {f"d{x} head {h}": (got[:, i * hd:(i + 1) * hd], ref[:, i * hd:(i + 1) * hd])
                for i, (x, h) in enumerate(heads)}
    return Kernel("attention_forward/attention_backward", f, df, parts=parts)


def attention_study(B, rng, lengths, H, hd, Hkv) -> Study:
    d, N = H * hd, sum(lengths)
    qkv = rng.normal(size=(N, 3 * d))
    return Study("attention", f"causal attention over {len(lengths)} packed sequences of lengths "
                 f"{', '.join(map(str, lengths))}: N={N}, H={H}, hd={hd}, d={d}",
                 {"qkv": qkv}, _attention_stages(lengths, H, H, hd), _attention_kernel(B, lengths, H, H),
                 rng.normal(size=(N, d)))


def gqa_study(B, rng, lengths, H, hd, Hkv) -> Study:
    N, G = sum(lengths), H // Hkv
    qkv = rng.normal(size=(N, (H + 2 * Hkv) * hd))
    return Study("gqa", f"grouped-query attention: H={H} query heads share Hkv={Hkv} key/value heads, G={G} query "
                 f"heads per group, hd={hd}; {len(lengths)} packed sequences of lengths "
                 f"{', '.join(map(str, lengths))}: N={N}, qkv (N, (H + 2 Hkv) hd) = ({N}, {(H + 2 * Hkv) * hd}); "
                 "kr and vr each feed G query heads, so dk and dv sum over the group",
                 {"qkv": qkv}, _attention_stages(lengths, H, Hkv, hd), _attention_kernel(B, lengths, H, Hkv),
                 rng.normal(size=(N, H * hd)))


def softmax_study(B, rng, lengths, H, hd, Hkv) -> Study:
    L = lengths[0]
    stages = [
        Stage("e", ("s",), "e = exp(s)", "ds = de * e", lambda s: np.exp(s), lambda de, e, s: (de * e,)),
        Stage("z", ("e",), "z = sum_j e_j   (one per row)", "de = dz, the same for every j of the row",
              lambda e: e.sum(axis=-1, keepdims=True), lambda dz, z, e: (np.broadcast_to(dz, e.shape).copy(),)),
        Stage("p", ("e", "z"), "p = e / z", "de = dp / z;  dz = -sum_j(dp * e) / z^2",
              lambda e, z: e / z, lambda dp, p, e, z: (dp / z, -(dp * e).sum(axis=-1, keepdims=True) / z ** 2)),
    ]
    kernel = Kernel("softmax_forward/softmax_backward", lambda v: nb.softmax_forward(v["s"]),
                    lambda g, v: {"s": nb.softmax_backward(g, nb.softmax_forward(v["s"]))})
    s = rng.normal(size=(H, L, L)) * 2
    return Study("softmax", f"softmax over the rows of scores (H, L, L) = ({H}, {L}, {L}); e feeds z and p, so "
                 "its two gradients add, and the kernel fuses all three: ds = p * (dp - sum_j(dp * p))",
                 {"s": s}, stages, kernel, rng.normal(size=s.shape))


def layernorm_study(B, rng, lengths, H, hd, Hkv) -> Study:
    N, d = sum(lengths), H * hd
    stages = [
        Stage("mean", ("x",), "mean = sum_j x_j / d   (one per row)", "dx = dmean / d, for every j",
              lambda x: x.mean(axis=-1, keepdims=True),
              lambda dm, m, x: (np.broadcast_to(dm / d, x.shape).copy(),)),
        Stage("xc", ("x", "mean"), "xc = x - mean", "dx = dxc;  dmean = -sum_j dxc",
              lambda x, m: x - m, lambda g, xc, x, m: (g, -g.sum(axis=-1, keepdims=True))),
        Stage("var", ("xc",), "var = sum_j xc_j^2 / d", "dxc = dvar * 2 xc / d",
              lambda xc: (xc * xc).mean(axis=-1, keepdims=True), lambda g, var, xc: (g * 2 * xc / d,)),
        Stage("rstd", ("var",), f"rstd = 1 / sqrt(var + {LN_EPS:g})", "dvar = -drstd * rstd^3 / 2",
              lambda var: 1.0 / np.sqrt(var + LN_EPS), lambda g, rstd, var: (-0.5 * g * rstd ** 3,)),
        Stage("xhat", ("xc", "rstd"), "xhat = xc * rstd", "dxc = dxhat * rstd;  drstd = sum_j dxhat * xc",
              lambda xc, r: xc * r, lambda g, xh, xc, r: (g * r, (g * xc).sum(axis=-1, keepdims=True))),
        Stage("out", ("xhat", "w", "b"), "out = xhat * w + b",
              "dxhat = dout * w;  dw = sum_n dout * xhat;  db = sum_n dout",
              lambda xh, w, b: xh * w + b, lambda g, out, xh, w, b: (g * w, (g * xh).sum(axis=0), g.sum(axis=0))),
    ]

    def kernel_df(g, v):
        _, mean, rstd = B.layernorm_forward(v["x"], v["w"], v["b"])
        return dict(zip(("x", "w", "b"), B.layernorm_backward(g, v["x"], v["w"], mean, rstd)))
    kernel = Kernel("layernorm_forward/layernorm_backward", lambda v: B.layernorm_forward(v["x"], v["w"], v["b"])[0],
                    kernel_df)
    leaves = {"x": rng.normal(size=(N, d)) * 2 + 0.5, "w": rng.normal(size=d), "b": rng.normal(size=d)}
    return Study("layernorm", f"layernorm of x (N, d) = ({N}, {d}) over each row; x feeds mean and xc, xc feeds "
                 "var and xhat: their gradients add, and the kernel sums them in one line: "
                 "dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))",
                 leaves, stages, kernel, rng.normal(size=(N, d)))


def gelu_study(B, rng, lengths, H, hd, Hkv) -> Study:
    N, d = sum(lengths), H * hd
    c, a = nb.GELU_C, 0.044715
    stages = [
        Stage("u", ("x",), f"u = c (x + {a} x^3),  c = sqrt(2/pi)", f"dx = du * c (1 + 3 * {a} x^2)",
              lambda x: c * (x + a * x * x * x), lambda g, u, x: (g * c * (1.0 + 3 * a * x * x),)),
        Stage("t", ("u",), "t = tanh(u)", "du = dt * (1 - t^2)", np.tanh, lambda g, t, u: (g * (1.0 - t * t),)),
        Stage("out", ("x", "t"), "out = 0.5 x (1 + t)", "dx = dout * 0.5 (1 + t);  dt = dout * 0.5 x",
              lambda x, t: 0.5 * x * (1.0 + t), lambda g, out, x, t: (g * 0.5 * (1.0 + t), g * 0.5 * x)),
    ]
    kernel = Kernel("gelu_forward/gelu_backward", lambda v: B.gelu_forward(v["x"]),
                    lambda g, v: {"x": B.gelu_backward(g, v["x"])})
    return Study("gelu", f"tanh-GELU of x (N, d) = ({N}, {d}); x feeds u and out, so its two gradients add",
                 {"x": rng.normal(size=(N, d)) * 2}, stages, kernel, rng.normal(size=(N, d)))


def linear_study(B, rng, lengths, H, hd, Hkv) -> Study:
    N, d = sum(lengths), H * hd
    stages = [
        Stage("xw", ("x", "w"), "xw = x @ w   (w is (in, out): Conv1D layout)", "dx = dxw @ wT;  dw = xT @ dxw",
              lambda x, w: x @ w, lambda g, xw, x, w: (g @ w.T, x.T @ g)),
        Stage("y", ("xw", "b"), "y = xw + b   (b added to every row)", "dxw = dy;  db = sum_n dy",
              lambda xw, b: xw + b, lambda g, y, xw, b: (g, g.sum(axis=0))),
    ]

    def kernel_df(g, v):
        return dict(zip(("x", "w", "b"), B.linear_backward(g, v["x"], v["w"])))
    kernel = Kernel("linear_forward/linear_backward", lambda v: B.linear_forward(v["x"], v["w"], v["b"]), kernel_df)
    leaves = {"x": rng.normal(size=(N, d)), "w": rng.normal(size=(d, D_OUT)), "b": rng.normal(size=D_OUT)}
    return Study("linear", f"linear layer x (N, in) = ({N}, {d}) -> y (N, out) = ({N}, {D_OUT})",
                 leaves, stages, kernel, rng.normal(size=(N, D_OUT)))


def _tokens(rng, N, V):
    """Token ids (N,) with one token at two positions at least: a scatter in place of the embedding's
    scatter-add keeps one of the two gradients, and only a repeat shows it."""
    tokens = rng.integers(0, V, N)
    i, j = rng.choice(N, 2, replace=False)
    tokens[j] = tokens[i]
    return tokens                                                                        # (N,)


def embedding_study(B, rng, lengths, H, hd, Hkv) -> Study:
    N, d, V = sum(lengths), H * hd, VOCAB
    tokens, positions = _tokens(rng, N, V), _positions(lengths)                          # (N,) each

    def lookup(ids, name):
        def df(g, out, table):
            dtable = np.zeros_like(table)
            np.add.at(dtable, ids, g)  # a row read at k positions gets the sum of their k gradients
            return (dtable,)
        return Stage(name[1:], (name,), f"{name[1:]} = {name}[{'tokens' if name == 'wte' else 'positions'}]",
                     f"d{name}[ids] += d{name[1:]}   (a scatter-ADD: ids repeat)", lambda t: t[ids], df)

    stages = [lookup(tokens, "wte"), lookup(positions, "wpe"),
              Stage("x", ("te", "pe"), "x = te + pe", "dte = dx;  dpe = dx", lambda te, pe: te + pe,
                    lambda g, x, te, pe: (g, g))]

    def kernel_df(g, v):
        dwte, dwpe = np.zeros_like(v["wte"]), np.zeros_like(v["wpe"])
        B.embedding_backward(dwte, dwpe, g, tokens, positions)
        return {"wte": dwte, "wpe": dwpe}
    kernel = Kernel("embedding_forward/embedding_backward",
                    lambda v: B.embedding_forward(tokens, positions, v["wte"], v["wpe"]), kernel_df)
    leaves = {"wte": rng.normal(size=(V, d)), "wpe": rng.normal(size=(max(lengths), d))}
    return Study("embedding", f"token and position embedding: wte (V, d) = ({V}, {d}), wpe (C, d) = "
                 f"({max(lengths)}, {d}), tokens {tokens.tolist()} (one repeats, by construction), positions "
                 f"{positions.tolist()} (each restarts per sequence, so they repeat too)", leaves, stages, kernel,
                 rng.normal(size=(N, d)))


def _targets(rng, lengths, V):
    """Next-token targets, -100 on each sequence's first position (as a masked prompt would be)."""
    targets = rng.integers(0, V, sum(lengths))
    targets[_cu(lengths)[:-1]] = IGNORE_INDEX
    return targets                                                                       # (N,)


def cross_entropy_study(B, rng, lengths, H, hd, Hkv) -> Study:
    N, d, V = sum(lengths), H * hd, VOCAB
    targets = _targets(rng, lengths, V)
    rows = np.flatnonzero(targets != IGNORE_INDEX)                                       # (M,)
    M, t = len(rows), targets[rows]
    at_t = (np.arange(M), t)

    def hv_df(g, hv, h):
        dh = np.zeros_like(h)                                                            # (N, d)
        dh[rows] = g
        return (dh,)

    def lse_f(logits):
        m = logits.max(axis=-1, keepdims=True)
        return (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))[:, 0]       # (M,)

    def zt_df(g, zt, logits):
        dlogits = np.zeros_like(logits)                                                  # (M, V)
        dlogits[at_t] = g
        return (dlogits,)

    stages = [
        Stage("hv", ("h",), "hv = h[rows with a target]   (-100 rows never get logits)",
              "dh[rows] = dhv, 0 on the ignored rows", lambda h: h[rows], hv_df),
        Stage("logits", ("hv", "w"), "logits = hv @ wT", "dhv = dlogits @ w;  dw = dlogitsT @ hv",
              lambda hv, w: hv @ w.T, lambda g, lg, hv, w: (g @ w, g.T @ hv)),
        Stage("lse", ("logits",), "lse = log(sum_v exp(logits_v))   (one per row)",
              "dlogits = dlse * softmax(logits)", lse_f,
              lambda g, lse, lg: (g[:, None] * np.exp(lg - lse[:, None]),)),
        Stage("zt", ("logits",), "zt = logits[i, t_i], the target's logit", "dlogits = dzt at t_i, 0 elsewhere",
              lambda lg: lg[at_t], zt_df),
        Stage("loss", ("lse", "zt"), "loss = sum_i (lse_i - zt_i) / M   (the mean over the M targets)",
              "dlse = dloss / M;  dzt = -dloss / M", lambda lse, zt: np.array((lse - zt).sum() / M),
              lambda g, loss, lse, zt: (np.full(M, g / M), np.full(M, -g / M))),
    ]

    def kernel_df(g, v):
        dw = np.zeros_like(v["w"])
        _, _, dh = B.head_loss(v["h"], v["w"], targets, dw=dw, grad_scale=float(g) / M)
        return {"h": dh, "w": dw}
    kernel = Kernel("head_loss", lambda v: np.array(B.head_loss(v["h"], v["w"], targets)[0] / M), kernel_df)
    leaves = {"h": rng.normal(size=(N, d)), "w": rng.normal(size=(V, d))}
    return Study("cross-entropy", f"output head + cross-entropy: h (N, d) = ({N}, {d}), w (V, d) = ({V}, {d}), "
                 f"targets {targets.tolist()}; logits feeds lse and zt, so dlogits = (softmax - onehot(t)) / M, "
                 "as head_loss computes it a chunk of rows at a time", leaves, stages, kernel, np.array(1.0),
                 meta={"targets": targets})


# ---- block and model: stages are the backend's kernels ---------------------------------------------
def _kernel_stages(block_stages, ops, p, x, names) -> list:
    """A block's stages (minisft.block's or minisft.llama's list) as study stages, each through its op's
    numpy kernels in ops ({op: (f(*ins), df(dout, out, *ins))}), reading x and the parameters named
    p + HF name that names holds (a linear's absent bias is left out). Stage names are p + the block's."""
    return [Stage(p + st.out, tuple(x if n == "x" else p + n for n in st.ins) +
                  tuple(n for n in st.params(p) if n in names), st.forward, st.backward, *ops[st.op])
            for st in block_stages]


def _block_stages(B, p, x, cu, H, L_max, names):
    """The stages of one GPT block, minisft.block's list, each through the numpy backend's kernels as
    model._block runs them (no dropout)."""
    def layernorm_df(g, out, xx, ww, bb):
        _, mean, rstd = B.layernorm_forward(xx, ww, bb)
        return B.layernorm_backward(g, xx, ww, mean, rstd)

    def att_df(g, out, qkv):
        y, ctx = B.attention_forward(qkv, cu, H, L_max)
        return (B.attention_backward(g, qkv, y, ctx, cu, H, L_max),)
    ops = {  # op -> (f(*ins), df(dout, out, *ins))
        "layernorm": (lambda xx, ww, bb: B.layernorm_forward(xx, ww, bb)[0], layernorm_df),
        "linear": (B.linear_forward, lambda g, out, xx, ww, bb: B.linear_backward(g, xx, ww)),
        "attention": (lambda qkv: B.attention_forward(qkv, cu, H, L_max)[0], att_df),
        "gelu": (B.gelu_forward, lambda g, out, fch: (B.gelu_backward(g, fch),)),
        "residual": (B.residual_forward, lambda g, out, aa, bb: B.residual_backward(g)),
    }
    return _kernel_stages(block.stages(), ops, p, x, names)


def _chain_kernel(name, stages, names) -> Kernel:
    """The stages chained end to end from the leaves named names, forward and backward, as model._walk
    and model._backward run a block: the check that the stages compose."""
    def chain(v):
        return _forward(stages, v)[stages[-1].out]

    def chain_grads(g, v):
        grads = _backprop(stages, _forward(stages, v), g)[0]
        return {n: grads[n] for n in names}
    return Kernel(name, chain, chain_grads, separate=False)


def _tiny_config(lengths, H, hd, n_layers) -> GPTConfig:
    return GPTConfig(vocab_size=VOCAB, context_length=max(lengths), emb_dim=H * hd, n_layers=n_layers, n_heads=H)


def _params(rng, cfg, prefix=""):
    """The parameters named prefix... in the family's param_shapes, drawn at the scale of ones (norm
    gains near 1), not the models' init, so that every gradient is well away from zero."""
    out = {}
    for name, shape in family.param_shapes(cfg).items():
        if name.startswith(prefix):
            gain = name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "norm.weight"))
            out[name] = (1.0 if gain else 0.0) + rng.normal(size=shape) * (0.3 if gain else 0.5)
    return out


def block_study(B, rng, lengths, H, hd, Hkv) -> Study:
    cfg, cu = _tiny_config(lengths, H, hd, 1), _cu(lengths)
    N, d = sum(lengths), H * hd
    leaves = {"x": rng.normal(size=(N, d)), **_params(rng, cfg, "h.0.")}
    stages = _block_stages(B, "h.0.", "x", cu, H, max(lengths), leaves)
    return Study("block", f"one GPT block (pre-layernorm, no dropout): x (N, d) = ({N}, {d}), H={H}, hd={hd}, "
                 f"packed lengths {', '.join(map(str, lengths))}; x feeds ln_1 and the skip, x2 feeds ln_2 and "
                 "the skip: their gradients add", leaves, stages, _chain_kernel("block (end to end)", stages, leaves),
                 rng.normal(size=(N, d)))


def model_study(B, rng, lengths, H, hd, Hkv) -> Study:
    from .model import GPT
    cfg, cu = _tiny_config(lengths, H, hd, MODEL_LAYERS), _cu(lengths)
    N, V = sum(lengths), VOCAB
    tokens = _tokens(rng, N, V)                                                         # (N,)
    targets = _targets(rng, lengths, V)                                                 # (N,)
    positions = _positions(lengths)                                                     # (N,)
    M = int(np.count_nonzero(targets != IGNORE_INDEX))
    leaves = _params(rng, cfg)

    def emb_df(g, x, wte, wpe):
        dwte, dwpe = np.zeros_like(wte), np.zeros_like(wpe)
        B.embedding_backward(dwte, dwpe, g, tokens, positions)
        return dwte, dwpe

    def lnf_df(g, out, x, w, b):
        _, mean, rstd = B.layernorm_forward(x, w, b)
        return B.layernorm_backward(g, x, w, mean, rstd)

    def loss_df(g, loss, lnf, w):
        dw = np.zeros_like(w)
        _, _, dh = B.head_loss(lnf, w, targets, dw=dw, grad_scale=float(g) / M)
        return dh, dw

    stages = [Stage("x", ("wte.weight", "wpe.weight"), f"x = wte[tokens] + wpe[positions],  tokens {tokens.tolist()}",
                    "dwte[tokens] += dx;  dwpe[positions] += dx   (scatter-add: tokens repeat)",
                    lambda wte, wpe: B.embedding_forward(tokens, positions, wte, wpe), emb_df)]
    x = "x"
    for i in range(cfg.n_layers):
        stages += _block_stages(B, f"h.{i}.", x, cu, H, max(lengths), leaves)
        x = f"h.{i}.out"
    stages += [
        Stage("lnf", (x, "ln_f.weight", "ln_f.bias"), "lnf = layernorm(x; ln_f)",
              "dx, dw, db = layernorm_backward(dlnf)", lambda xx, w, b: B.layernorm_forward(xx, w, b)[0], lnf_df),
        Stage("loss", ("lnf", "lm_head.weight"),
              f"loss = mean cross-entropy of lnf @ lm_headT,  targets {targets.tolist()}",
              "dlnf, dw = head_loss(...)   (softmax - onehot, a chunk of rows at a time)",
              lambda lnf, w: np.array(B.head_loss(lnf, w, targets)[0] / M), loss_df),
    ]
    batch = PackedBatch(tokens, targets, positions, cu)

    def model(v):
        return GPT(cfg, backend=B, params=v)

    def model_df(g, v):
        m = model(v)
        m.forward_backward(batch, grad_scale=float(g) / M)
        return {n: B.to_numpy(m.grads[n]) for n in v}
    kernel = Kernel("GPT.forward_backward", lambda v: np.array(model(v).loss(batch)[0] / M), model_df)
    return Study("model", f"the whole GPT: {cfg.n_layers} blocks, d={cfg.emb_dim}, H={H}, V={V}, packed lengths "
                 f"{', '.join(map(str, lengths))}, the mean loss over its {M} targets", leaves, stages, kernel,
                 np.array(1.0), meta={"targets": targets, "tokens": tokens, "cfg": cfg})


# ---- the Llama family's ops (minisft/llama.py) ------------------------------------------------------
def _llama_config(lengths, H, hd, Hkv) -> llama.LlamaConfig:
    """A one-block Llama of the study's shape, the width d = H hd, the MLP's f = LLAMA_FFN d. Its context
    (the rotation tables' length) is N, so that a kernel reading row numbers for positions gets angles,
    not an IndexError, and the checks show it."""
    return llama.LlamaConfig(vocab_size=VOCAB, context_length=sum(lengths), emb_dim=H * hd, n_layers=1, n_heads=H,
                             n_kv_heads=Hkv, head_dim=hd, ffn_dim=LLAMA_FFN * H * hd, rope_theta=ROPE_THETA)


def rmsnorm_study(B, rng, lengths, H, hd, Hkv) -> Study:
    N, d = sum(lengths), H * hd
    stages = [
        Stage("ms", ("x",), "ms = sum_j x_j^2 / d   (one per row; no mean is taken)", "dx = dms * 2 x / d",
              lambda x: (x * x).mean(axis=-1, keepdims=True), lambda g, ms, x: (g * 2 * x / d,)),
        Stage("rstd", ("ms",), f"rstd = 1 / sqrt(ms + {RMS_EPS:g})", "dms = -drstd * rstd^3 / 2",
              lambda ms: 1.0 / np.sqrt(ms + RMS_EPS), lambda g, rstd, ms: (-0.5 * g * rstd ** 3,)),
        Stage("xhat", ("x", "rstd"), "xhat = x * rstd", "dx = dxhat * rstd;  drstd = sum_j dxhat * x",
              lambda x, r: x * r, lambda g, xh, x, r: (g * r, (g * x).sum(axis=-1, keepdims=True))),
        Stage("out", ("xhat", "w"), "out = xhat * w   (no bias)", "dxhat = dout * w;  dw = sum_n dout * xhat",
              lambda xh, w: xh * w, lambda g, out, xh, w: (g * w, (g * xh).sum(axis=0))),
    ]

    def kernel_df(g, v):
        _, rstd = B.rmsnorm_forward(v["x"], v["w"], RMS_EPS)
        return dict(zip(("x", "w"), B.rmsnorm_backward(g, v["x"], v["w"], rstd)))
    kernel = Kernel("rmsnorm_forward/rmsnorm_backward", lambda v: B.rmsnorm_forward(v["x"], v["w"], RMS_EPS)[0],
                    kernel_df)
    leaves = {"x": rng.normal(size=(N, d)) * 2 + 0.5, "w": rng.normal(size=d)}
    return Study("rmsnorm", f"RMSNorm of x (N, d) = ({N}, {d}) over each row; x feeds ms and xhat, so its two "
                 "gradients add, and the kernel sums them in one line: dx = rstd * (dxhat - xhat * mean(dxhat * "
                 "xhat)), layernorm's without the mean's term", leaves, stages, kernel, rng.normal(size=(N, d)))


def rope_study(B, rng, lengths, H, hd, Hkv) -> Study:
    N, half, nq = sum(lengths), hd // 2, H + Hkv
    W = (H + 2 * Hkv) * hd
    cos, sin = llama.rope_tables(hd, N, ROPE_THETA, None)                           # (N, hd/2): see _llama_config
    pos = _positions(lengths)
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]                               # (N, 1, hd/2) each row's angles

    def half_of(j):  # x1, x2 (N, H + Hkv, hd/2): the first or second half of every query and key head
        def f(qkv):
            return qkv.reshape(N, -1, hd)[:, :nq, j * half:(j + 1) * half].copy()

        def df(g, out, qkv):
            dqkv = np.zeros_like(qkv).reshape(N, -1, hd)                           # (N, H + 2 Hkv, hd)
            dqkv[:, :nq, j * half:(j + 1) * half] = g
            return (dqkv.reshape(N, W),)
        part = ":hd/2" if j == 0 else "hd/2:"
        return Stage(f"x{j + 1}", ("qkv",), f"x{j + 1} = [{part}] of every query and key head",
                     f"dqkv = dx{j + 1} at those entries, 0 elsewhere", f, df)

    def out_f(qkv, o1, o2):
        out = qkv.reshape(N, -1, hd).copy()                                        # (N, H + 2 Hkv, hd)
        out[:, :nq] = np.concatenate([o1, o2], axis=-1)
        return out.reshape(N, W)

    def out_df(g, out, qkv, o1, o2):
        dh = g.reshape(N, -1, hd)                                                  # (N, H + 2 Hkv, hd)
        dqkv = dh.copy()
        dqkv[:, :nq] = 0.0                                                         # rotated: not qkv's any more
        return dqkv.reshape(N, W), dh[:, :nq, :half].copy(), dh[:, :nq, half:].copy()

    stages = [
        half_of(0), half_of(1),
        Stage("out1", ("x1", "x2"), "out1 = x1 cos - x2 sin   (angle = position * inv_freq)",
              "dx1 = dout1 cos;  dx2 = -dout1 sin", lambda x1, x2: x1 * c - x2 * s,
              lambda g, o, x1, x2: (g * c, -g * s)),
        Stage("out2", ("x1", "x2"), "out2 = x2 cos + x1 sin", "dx1 = dout2 sin;  dx2 = dout2 cos",
              lambda x1, x2: x2 * c + x1 * s, lambda g, o, x1, x2: (g * s, g * c)),
        Stage("out", ("qkv", "out1", "out2"), "out = qkv with each query and key head [out1 | out2], value heads "
              "as they were", "dqkv = dout on the value heads;  dout1, dout2 = the halves of dout's q and k heads",
              out_f, out_df),
    ]
    kernel = Kernel("rope_forward/rope_backward", lambda v: B.rope_forward(v["qkv"], cos, sin, pos, nq),
                    lambda g, v: {"qkv": B.rope_backward(g, cos, sin, pos, nq)})
    return Study("rope", f"rotary position embedding of qkv (N, (H + 2 Hkv) hd) = ({N}, {W}): H={H} query and "
                 f"Hkv={Hkv} key heads of hd={hd} turn by position * theta^(-2i/hd), theta={ROPE_THETA:g}, "
                 f"positions {pos.tolist()} (restarting at each sequence); x1 and x2 each feed out1 and out2, and "
                 "their gradients add to the rotation by -angle: the kernel's backward is its forward with sin "
                 "negated", {"qkv": rng.normal(size=(N, W))}, stages, kernel, rng.normal(size=(N, W)))


def swiglu_study(B, rng, lengths, H, hd, Hkv) -> Study:
    N, f = sum(lengths), H * hd

    def part(j, name):  # gate = gu[:, :f], up = gu[:, f:]
        def df(g, out, gu):
            dgu = np.zeros_like(gu)                                                # (N, 2f)
            dgu[:, j * f:(j + 1) * f] = g
            return (dgu,)
        cols = ":f" if j == 0 else "f:"
        return Stage(name, ("gu",), f"{name} = gu[:, {cols}]", f"dgu[:, {cols}] = d{name}",
                     lambda gu: gu[:, j * f:(j + 1) * f].copy(), df)

    stages = [
        part(0, "gate"), part(1, "up"),
        Stage("sig", ("gate",), "sig = 1 / (1 + exp(-gate))", "dgate = dsig * sig (1 - sig)",
              lambda g: 1.0 / (1.0 + np.exp(-g)), lambda g, sig, gate: (g * sig * (1.0 - sig),)),
        Stage("silu", ("gate", "sig"), "silu = gate * sig", "dgate = dsilu * sig;  dsig = dsilu * gate",
              lambda g, sig: g * sig, lambda g, silu, gate, sig: (g * sig, g * gate)),
        Stage("out", ("silu", "up"), "out = silu * up", "dsilu = dout * up;  dup = dout * silu",
              lambda silu, up: silu * up, lambda g, out, silu, up: (g * up, g * silu)),
    ]
    kernel = Kernel("swiglu_forward/swiglu_backward", lambda v: B.swiglu_forward(v["gu"]),
                    lambda g, v: {"gu": B.swiglu_backward(g, v["gu"])})
    return Study("swiglu", f"SwiGLU of gu (N, 2f) = ({N}, {2 * f}) = [gate | up]: silu(gate) * up; gate feeds sig "
                 "and silu, so its two gradients add to silu'(gate) = sig (1 + gate (1 - sig))",
                 {"gu": rng.normal(size=(N, 2 * f)) * 2}, stages, kernel, rng.normal(size=(N, f)))


def qk_norm_study(B, rng, lengths, H, hd, Hkv) -> Study:
    N, nq = sum(lengths), H + Hkv
    W = (H + 2 * Hkv) * hd

    def qk_df(g, qk, qkv):
        dqkv = np.zeros_like(qkv)                                                  # (N, W)
        dqkv[:, :nq * hd] = g.reshape(N, nq * hd)
        return (dqkv,)

    def out_f(qkv, qkn):
        return np.concatenate([qkn.reshape(N, nq * hd), qkv[:, nq * hd:]], axis=1)  # (N, W)

    def out_df(g, out, qkv, qkn):
        dqkv = g.copy()
        dqkv[:, :nq * hd] = 0.0                                                    # normalised: not qkv's any more
        return dqkv, g[:, :nq * hd].reshape(N, nq, hd)

    stages = [
        Stage("qk", ("qkv",), "qk = qkv's H query and Hkv key heads, one row of hd each",
              "dqkv = dqk on those columns, 0 on the value heads", lambda qkv: qkv[:, :nq * hd].reshape(N, nq, hd),
              qk_df),
        Stage("ms", ("qk",), "ms = sum_j qk_j^2 / hd   (one per head vector)", "dqk = dms * 2 qk / hd",
              lambda qk: (qk * qk).mean(axis=-1, keepdims=True), lambda g, ms, qk: (g * 2 * qk / hd,)),
        Stage("rstd", ("ms",), f"rstd = 1 / sqrt(ms + {RMS_EPS:g})", "dms = -drstd * rstd^3 / 2",
              lambda ms: 1.0 / np.sqrt(ms + RMS_EPS), lambda g, rstd, ms: (-0.5 * g * rstd ** 3,)),
        Stage("xhat", ("qk", "rstd"), "xhat = qk * rstd", "dqk = dxhat * rstd;  drstd = sum_j dxhat * qk",
              lambda qk, r: qk * r, lambda g, xh, qk, r: (g * r, (g * qk).sum(axis=-1, keepdims=True))),
        Stage("w", ("wq", "wk"), "w = wq for each of the H query heads, wk for each of the Hkv key heads",
              "dwq = sum of dw over the query heads;  dwk = sum over the key heads   (one weight, shared)",
              lambda wq, wk: np.stack([wq] * H + [wk] * Hkv),
              lambda g, w, wq, wk: (g[:H].sum(axis=0), g[H:].sum(axis=0))),
        Stage("qkn", ("xhat", "w"), "qkn = xhat * w", "dxhat = dqkn * w;  dw = sum_n dqkn * xhat",
              lambda xh, w: xh * w, lambda g, qkn, xh, w: (g * w, (g * xh).sum(axis=0))),
        Stage("out", ("qkv", "qkn"), "out = qkv with its q and k heads replaced by qkn, value heads as they were",
              "dqkv = dout on the value heads;  dqkn = dout on the q and k heads", out_f, out_df),
    ]

    def kernel_df(g, v):
        _, rstd = B.qk_norm_forward(v["qkv"], v["wq"], v["wk"], RMS_EPS, H, Hkv)
        return dict(zip(("qkv", "wq", "wk"), B.qk_norm_backward(g, v["qkv"], v["wq"], v["wk"], rstd, H, Hkv)))
    kernel = Kernel("qk_norm_forward/qk_norm_backward",
                    lambda v: B.qk_norm_forward(v["qkv"], v["wq"], v["wk"], RMS_EPS, H, Hkv)[0], kernel_df)
    leaves = {"qkv": rng.normal(size=(N, W)) * 1.5, "wq": 1.0 + 0.3 * rng.normal(size=hd),
              "wk": 1.0 + 0.3 * rng.normal(size=hd)}
    return Study("qk_norm", f"Qwen3's q/k norm: an RMSNorm of each of the H={H} query and Hkv={Hkv} key heads of "
                 f"qkv (N, (H + 2 Hkv) hd) = ({N}, {W}), hd={hd}, wq shared by the query heads and wk by the key "
                 "heads (their gradients sum over the heads); the value heads pass through, so qkv feeds qk and "
                 "out and its gradients add", leaves, stages, kernel, rng.normal(size=(N, W)))


def _llama_block_stages(B, cfg, p, x, lengths, names):
    """The stages of one Llama-family block, minisft.llama's list, each through the numpy backend's kernels
    as model._block runs them."""
    H, Hkv, eps, L_max, nq = cfg.n_heads, cfg.n_kv_heads, cfg.rms_eps, max(lengths), cfg.n_heads + cfg.n_kv_heads
    cu, pos = _cu(lengths), _positions(lengths)
    cos, sin = llama.rope_tables(cfg.head_dim, cfg.context_length, cfg.rope_theta, cfg.rope_scaling)

    def rmsnorm_df(g, out, xx, ww):
        return B.rmsnorm_backward(g, xx, ww, B.rmsnorm_forward(xx, ww, eps)[1])

    def qk_norm_df(g, out, qkv, wq, wk):
        return B.qk_norm_backward(g, qkv, wq, wk, B.qk_norm_forward(qkv, wq, wk, eps, H, Hkv)[1], H, Hkv)

    def att_df(g, out, qkv):
        y, ctx = B.attention_forward(qkv, cu, H, L_max, n_kv_heads=Hkv)
        return (B.attention_backward(g, qkv, y, ctx, cu, H, L_max, n_kv_heads=Hkv),)
    ops = {  # op -> (f(*ins), df(dout, out, *ins)); a linear without bias (all but Qwen2's qkv) has two ins
        "rmsnorm": (lambda xx, ww: B.rmsnorm_forward(xx, ww, eps)[0], rmsnorm_df),
        "linear": (lambda xx, ww, bb=None: B.linear_forward(xx, ww, bb),
                   lambda g, out, xx, ww, *bb: B.linear_backward(g, xx, ww)[:2 + len(bb)]),
        "qk_norm": (lambda qkv, wq, wk: B.qk_norm_forward(qkv, wq, wk, eps, H, Hkv)[0], qk_norm_df),
        "rope": (lambda qkv: B.rope_forward(qkv, cos, sin, pos, nq),
                 lambda g, out, qkv: (B.rope_backward(g, cos, sin, pos, nq),)),
        "attention": (lambda qkv: B.attention_forward(qkv, cu, H, L_max, n_kv_heads=Hkv)[0], att_df),
        "swiglu": (B.swiglu_forward, lambda g, out, gu: (B.swiglu_backward(g, gu),)),
        "residual": (B.residual_forward, lambda g, out, aa, bb: B.residual_backward(g)),
    }
    return _kernel_stages(llama.stages(cfg), ops, p, x, names)


def llama_block_study(B, rng, lengths, H, hd, Hkv) -> Study:
    cfg, N = _llama_config(lengths, H, hd, Hkv), sum(lengths)
    d = cfg.emb_dim
    leaves = {"x": rng.normal(size=(N, d)), **_params(rng, cfg, "layers.0.")}
    stages = _llama_block_stages(B, cfg, "layers.0.", "x", lengths, leaves)
    return Study("llama-block", f"one Llama block (RMSNorm, RoPE, grouped-query attention, SwiGLU): x (N, d) = "
                 f"({N}, {d}), H={H} query heads over Hkv={Hkv} key/value heads of hd={hd}, f={cfg.ffn_dim}, "
                 f"packed lengths {', '.join(map(str, lengths))}, positions {_positions(lengths).tolist()}; x feeds "
                 "input_layernorm and the skip, x2 feeds post_attention_layernorm and the skip: their gradients add",
                 leaves, stages, _chain_kernel("llama block (end to end)", stages, leaves), rng.normal(size=(N, d)),
                 meta={"cfg": cfg})


# op -> (rng, lengths, H, hd, Hkv) -> Study. Hkv = H for the ops without key/value heads of their own.
STUDIES = {"attention": attention_study, "softmax": softmax_study, "layernorm": layernorm_study,
           "gelu": gelu_study, "linear": linear_study, "cross-entropy": cross_entropy_study,
           "embedding": embedding_study, "block": block_study, "model": model_study,
           "rmsnorm": rmsnorm_study, "rope": rope_study, "swiglu": swiglu_study, "gqa": gqa_study,
           "qk_norm": qk_norm_study, "llama-block": llama_block_study}
OPS = tuple(STUDIES)  # the ops `minisft study` takes, in the order its help lists them


def validate(op, lengths, heads, head_dim, kv_heads) -> None:
    if op not in STUDIES:
        raise MinisftError(f"study: unknown op {op!r}; choose one of {', '.join(OPS)}")
    if not lengths or any(L < 1 for L in lengths):
        raise MinisftError(f"study: --lengths must be positive sequence lengths, got {lengths}")
    if op in ("embedding", "model") and len(lengths) < 2:
        raise MinisftError(f"study: {op} needs 2 or more --lengths: positions repeat only across sequences, and "
                           "without a repeat a scatter in place of wpe's scatter-add passes")
    if op in ("attention", "gqa", "block", "model", "llama-block") and max(lengths) < 2:
        raise MinisftError("study: attention over sequences of 1 masks nothing: give a length of 2 or more")
    if op in ("cross-entropy", "model") and all(L < 2 for L in lengths):
        raise MinisftError("study: --lengths needs a sequence of 2 or more: the first position of each has no target")
    if heads < 1 or head_dim < 1:
        raise MinisftError(f"study: --heads and --head-dim must be positive, got {heads} and {head_dim}")
    if op in ("layernorm", "block", "model") and heads * head_dim < 3:
        # xhat of one or two entries is 0 or +-1 whatever x is: the gradient is only rounding noise
        raise MinisftError("study: a layernorm over d < 3 entries is constant: give --heads x --head-dim of 3 or more")
    if op == "softmax" and lengths[0] < 2:
        raise MinisftError("study: a softmax over 1 entry is constant: the first of --lengths must be 2 or more")
    if op not in GROUPED_OPS:
        if kv_heads is not None:
            raise MinisftError(f"study: --kv-heads is for {', '.join(GROUPED_OPS)}; {op} has no key/value heads "
                               "of its own")
        return
    if kv_heads < 1 or heads % kv_heads:
        raise MinisftError(f"study: --kv-heads must divide --heads, got {kv_heads} and {heads}")
    if op == "gqa" and heads == kv_heads:
        # with one query head per key/value head, a backward that forgets the group's sum passes
        raise MinisftError("study: gqa needs groups of 2 or more query heads: give --heads a multiple of --kv-heads "
                           "(study attention is the ungrouped one)")
    if op in ("rope", "llama-block") and head_dim % 2:
        raise MinisftError(f"study: RoPE rotates pairs: --head-dim must be even, got {head_dim}")
    if op == "rope" and (head_dim < 4 or max(lengths) < 2):
        # at position 0 nothing turns, and at hd = 2 the half split and an interleaved one are the same pair
        raise MinisftError("study: rope needs --head-dim of 4 or more and a sequence of 2 or more positions")
    if op in ("rmsnorm", "llama-block", "qk_norm") and (head_dim if op == "qk_norm" else heads * head_dim) < 2:
        raise MinisftError("study: an rmsnorm over 1 entry is sign(x) whatever x is: give it 2 or more")


# ---- a learner's kernel in place of the reference (`--kernel FILE:FUNCTION`) --------------------------
BACKWARDS = tuple(sorted(n for n in vars(nb.NumpyBackend) if n.endswith("_backward"))) + ("head_loss",)


class KernelFailed(Exception):
    """A learner's kernel raised, or returned something of another kind or shape than the reference."""


def load_kernel(spec: str) -> tuple:
    """FILE:FUNCTION -> (FUNCTION, the function), loaded from FILE's path with importlib (no import path,
    nothing in the repository touched). FUNCTION names the numpy backend's backward it stands in for,
    and takes the same arguments but self."""
    path, sep, name = spec.rpartition(":")
    if not (sep and path and name):
        raise MinisftError(f"study: --kernel takes FILE:FUNCTION, like docs/exercises/2_layernorm.py:"
                           f"layernorm_backward, not {spec!r}")
    if name not in BACKWARDS:
        raise MinisftError(f"study: --kernel {name!r} is not a backward of the numpy backend; "
                           f"one of {', '.join(BACKWARDS)}")
    if not Path(path).is_file():
        raise MinisftError(f"study: --kernel: no file {path}")
    module_spec = importlib.util.spec_from_file_location(f"minisft_study_kernel_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the learner's file: any error in it is theirs to read, in one line
        raise MinisftError(f"study: --kernel: {path} does not load: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise MinisftError(f"study: --kernel: {path} defines no function {name}")
    want = list(inspect.signature(getattr(nb.NumpyBackend, name)).parameters)[1:]  # without self
    got = list(inspect.signature(fn).parameters)
    if got != want:
        raise MinisftError(f"study: --kernel: {path} has {name}({', '.join(got)}); the reference takes "
                           f"({', '.join(want)})")
    return name, _checked(name, fn, path)


def _checked(name, fn, path):
    """fn, raising KernelFailed (one line) where it raises or returns another structure than the reference
    on the same arguments (a `...` left in an exercise, a transposed shape)."""
    reference = getattr(nb.NumpyBackend("float64"), name)

    def same(got, ref, what):
        if isinstance(ref, tuple):
            if not isinstance(got, (tuple, list)) or len(got) != len(ref):
                raise KernelFailed(f"study: {name} returned {type(got).__name__} where the reference returns "
                                   f"a tuple of {len(ref)}")
            for i, (g, r) in enumerate(zip(got, ref)):
                same(g, r, f"output {i}")
        elif isinstance(ref, np.ndarray) and (not isinstance(got, np.ndarray) or got.shape != ref.shape):
            kind = f"shape {got.shape}" if isinstance(got, np.ndarray) else repr(got)
            raise KernelFailed(f"study: {name} returned {what} = {kind} where the reference returns shape "
                               f"{ref.shape}" + (" (a blank left to fill?)" if got is Ellipsis else ""))

    def run(*args, **kw):
        run.calls += 1
        ref = reference(*copy.deepcopy(args), **copy.deepcopy(kw))  # the reference adds into dw: a copy
        try:
            got = fn(*args, **kw)
        except Exception as e:  # the learner's code: where in their file, in one line
            mine = Path(path).resolve()
            line = [f.lineno for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == mine]
            raise KernelFailed(f"study: {name} in {path} raised {type(e).__name__}: {e}"
                               + (f" (line {line[-1]})" if line else "")) from None
        same(got, ref, "its output")
        return got
    run.calls = 0
    return run


def study(op, seed=0, lengths=(4, 3), heads=None, head_dim=None, kv_heads=None, kernel=None) -> Study:
    """Build and run the study of op on fresh random inputs drawn from seed. heads and head_dim default
    to GPT2_SHAPE for GPT-2's ops, LLAMA_SHAPE for the Llama family's; kv_heads to KV_HEADS for the
    grouped ones (the others take none). kernel: (name, function), load_kernel's, run wherever the
    study runs the numpy backend's name."""
    lengths = [int(L) for L in lengths]
    dh, dhd = LLAMA_SHAPE if op in LLAMA_OPS else GPT2_SHAPE
    heads = dh if heads is None else heads
    head_dim = dhd if head_dim is None else head_dim
    if kv_heads is None and op in GROUPED_OPS:
        kv_heads = KV_HEADS
    validate(op, lengths, heads, head_dim, kv_heads)
    rng = np.random.default_rng(seed)
    B = nb.NumpyBackend("float64")
    if kernel is not None:
        setattr(B, *kernel)  # on this instance only: the class, and every other study, keep the reference
    s = STUDIES[op](B, rng, lengths, heads, head_dim, heads if kv_heads is None else kv_heads)
    s.meta = {**(s.meta or {}), "lengths": lengths, "heads": heads, "head_dim": head_dim, "kv_heads": kv_heads}
    s = run_study(s, rng)
    if kernel is not None and not kernel[1].calls:
        raise MinisftError(f"study: {op} never runs {kernel[0]}; the kernel line of its printout names the "
                           "kernel it checks")
    return s


# ---- printing -----------------------------------------------------------------------------------
def _array_lines(v, indent) -> list:
    """Small arrays whole, bigger ones as mean / std / min / max."""
    lines = []
    for s, p in enumerate(_parts(v)):
        label = f"seq {s}: " if isinstance(v, list) else ""
        if p.size <= PRINT_WHOLE:
            text = np.array2string(np.asarray(p), precision=4, suppress_small=True, max_line_width=110,
                                   floatmode="fixed", sign=" ")
            rows = text.splitlines()
            lines += [indent + label + rows[0]] + [(indent + " " * len(label) + r).rstrip() for r in rows[1:]]
        else:
            lines.append(f"{indent}{label}{p.size} values: mean {p.mean(): .4f}, std {p.std():.4f}, "
                         f"min {p.min(): .4f}, max {p.max(): .4f}")
    return lines


def format_study(s: Study, torch_grads=None, values=True) -> list:
    """The printed walk: inputs, the forward stage by stage, the backward in reverse with every
    finite-difference error, the kernel checks and (when given) PyTorch autograd's gradients.
    values=False leaves out the arrays themselves: shapes, formulas and errors only."""
    def array_lines(v, indent):
        return _array_lines(v, indent) if values else []
    checks = {c.what: c for c in s.checks}
    mark = {True: "ok", False: "FAILED"}
    w = max(len(n) for n in s.values) + 2                        # name column, room for a "d"
    sw = max(len(_shape(v)) for v in s.values.values())          # shape column
    iw = len(str(len(s.stages))) + 2                              # "[i]" column
    lines = [f"minisft study {s.op}: {s.title}", "", "inputs"]
    for n, v in s.leaves.items():
        lines.append(f"  {n:<{w}} {_shape(v)}")
        lines += array_lines(v, " " * 4)
    lines += ["", "forward"]
    for i, st in enumerate(s.stages, 1):
        lines.append(f"  {f'[{i}]':<{iw}} {st.out:<{w}} {_shape(s.values[st.out]):<{sw}}   {st.forward}")
        lines += array_lines(s.values[st.out], " " * 6)
    final = s.stages[-1].out
    lines += ["", f"backward (each stage's gradients checked against five-point central differences of its "
              f"forward, step {FD_EPS:g}, tolerance {FD_TOL:g})",
              f"  {'':<{iw}} {'d' + final:<{w}} {_shape(s.dout):<{sw}}   "
              f"{'1: the loss itself' if np.ndim(s.dout) == 0 else 'random: the gradient arriving from above'}"]
    lines += array_lines(s.dout, " " * 6)
    for i, st in reversed(list(enumerate(s.stages, 1))):
        lines.append(f"  {f'[{i}]':<{iw}} {st.out:<{w}} backward   {st.backward}")
        for n, g in zip(st.ins, s.local[st.out]):
            c = checks[f"{st.out}: d{n}"]
            adds = "   (added to the gradient it already has)" if (st.out, n) in s.adds else ""
            lines.append(f"  {'':<{iw}} {'d' + n:<{w}} {_shape(g):<{sw}}   finite differences: error {c.err:.1e} "
                         f"{mark[c.ok]}{adds}")
            lines += array_lines(g, " " * 8)
    lines += ["", f"kernel: {s.kernel.name} on the same inputs"]
    kernel_checks = [(c.what[len(s.kernel.name) + 1:], c) for c in s.checks if c.what.startswith(s.kernel.name)]
    kw = max(len(what) for what, _ in kernel_checks)
    for what, c in kernel_checks:
        lines.append(f"  {what:<{kw}}   error {c.err:.1e} (<= {c.tol:g}) {mark[c.ok]}")
    if torch_grads is not None:
        lines += ["", "PyTorch autograd on the same inputs and output gradient"]
        for n, g in torch_grads.items():
            c = checks[f"autograd: d{n}"]
            lines.append(f"  {'d' + n:<{w}} {_shape(g):<{sw}}   ours vs autograd: error {c.err:.1e} (<= {c.tol:g}) "
                         f"{mark[c.ok]}")
            if values and sum(p.size for p in _parts(g)) <= PRINT_WHOLE:
                lines += ["    autograd"] + array_lines(g, " " * 6)
    failed = [c for c in s.checks if not c.ok]
    lines += ["", f"{len(s.checks) - len(failed)} of {len(s.checks)} checks passed" +
              ("" if not failed else "; FAILED: " + ", ".join(c.what for c in failed))]
    first = first_failure(s)
    if first is not None:
        lines.append(f"first failure in backward order: {first.what} (error {first.err:.1e})")
        lines += localise(s)
    return lines


# ---- PyTorch autograd, side by side ---------------------------------------------------------------
def torch_gradients(s: Study) -> dict:
    """PyTorch autograd's gradients of dot(dout, output), computed with PyTorch's own ops (F.layer_norm,
    F.gelu, F.silu, F.cross_entropy, scaled_dot_product_attention, ...; RMSNorm and RoPE as Hugging
    Face's Llama writes them, rotate_half included) from the same inputs: {name: gradient} for every
    input, and for attention also its per-head q, k, v, scores and p (gqa: also kr, vr); each is added
    to the study's checks against our gradient. Imports torch."""
    import torch
    import torch.nn.functional as F
    m = s.meta
    lengths, H, hd = m["lengths"], m["heads"], m["head_dim"]
    Hkv = m["kv_heads"] or H
    G = H // Hkv
    T = {n: torch.tensor(v, dtype=torch.float64, requires_grad=True) for n, v in s.leaves.items()}
    positions = torch.tensor(_positions(lengths))
    kept = {}

    def keep(name, t):
        t.retain_grad()
        kept.setdefault(name, []).append(t)
        return t

    def layernorm(x, w, b):
        return F.layer_norm(x, (x.shape[-1],), w, b, eps=LN_EPS)

    def rmsnorm(x, w):  # LlamaRMSNorm
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS) * w

    def rotate_half(x):
        x1, x2 = x[..., :x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    def rope(qkv):  # HF's apply_rotary_pos_emb on the query and key heads; the value heads as they were
        cos, sin = (torch.tensor(t)[positions].repeat(1, 2)[:, None, :]            # (N, 1, hd): [c | c]
                    for t in llama.rope_tables(hd, sum(lengths), ROPE_THETA, None))
        heads = qkv.view(qkv.shape[0], H + 2 * Hkv, hd)
        qk = heads[:, :H + Hkv]
        return torch.cat([qk * cos + rotate_half(qk) * sin, heads[:, H + Hkv:]], dim=1).reshape(qkv.shape)

    def qk_norm(qkv, wq, wk):  # Qwen3's q_norm, k_norm: an RMSNorm of each head vector
        heads = qkv.view(qkv.shape[0], H + 2 * Hkv, hd)
        return torch.cat([rmsnorm(heads[:, :H], wq), rmsnorm(heads[:, H:H + Hkv], wk), heads[:, H + Hkv:]],
                         dim=1).reshape(qkv.shape)

    def swiglu(gu):
        gate, up = gu.chunk(2, dim=-1)
        return F.silu(gate) * up

    def attention(qkv, record):
        outs, a = [], 0
        for L in lengths:
            q, k, v = (qkv[a:a + L, c0 * hd:c1 * hd].view(L, c1 - c0, hd).transpose(0, 1)  # (heads, L, hd)
                       for c0, c1 in ((0, H), (H, H + Hkv), (H + Hkv, H + 2 * Hkv)))
            if record:
                q, k, v = keep("q", q), keep("k", k), keep("v", v)
            # query head h reads key/value head h // G
            k, v = (k, v) if G == 1 else (t.repeat_interleave(G, dim=0) for t in (k, v))
            if record:
                if G > 1:
                    k, v = keep("kr", k), keep("vr", v)
                scores = keep("scores", (q @ k.transpose(1, 2)) / math.sqrt(hd))
                causal = torch.ones(L, L, dtype=torch.bool).tril()
                y = keep("p", scores.masked_fill(~causal, float("-inf")).softmax(-1)) @ v
            else:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            outs.append(y.transpose(0, 1).reshape(L, H * hd))
            a += L
        return torch.cat(outs)                                                     # (N, H hd)

    def walk(stages, ops, x):  # a block's stages, each through PyTorch's ops
        values = {"x": x}
        for st in stages:
            values[st.out] = ops[st.op](st, *[values[n] for n in st.ins])
        return values[stages[-1].out]

    def torch_block(x, p):  # minisft.block's stages
        ops = {"layernorm": lambda st, xx: layernorm(xx, *(T[n] for n in block.params(st, p))),
               "linear": lambda st, xx: xx @ T[p + st.module + ".weight"] + T[p + st.module + ".bias"],
               "attention": lambda st, qkv: attention(qkv, False),
               "gelu": lambda st, xx: F.gelu(xx, approximate="tanh"),
               "residual": lambda st, a, b: a + b}
        return walk(block.stages(), ops, x)

    def torch_llama_block(x, p):  # minisft.llama's stages
        def linear(st, xx):
            b = T.get(p + st.module + ".bias")
            return xx @ T[p + st.module + ".weight"] + (0 if b is None else b)
        ops = {"rmsnorm": lambda st, xx: rmsnorm(xx, *(T[n] for n in st.params(p))),
               "linear": linear, "qk_norm": lambda st, qkv: qk_norm(qkv, *(T[n] for n in st.params(p))),
               "rope": lambda st, qkv: rope(qkv), "attention": lambda st, qkv: attention(qkv, False),
               "swiglu": lambda st, gu: swiglu(gu), "residual": lambda st, a, b: a + b}
        return walk(llama.stages(m["cfg"]), ops, x)

    op = s.op
    if op in ("attention", "gqa"):
        out = attention(T["qkv"], True)
    elif op == "softmax":
        out = torch.softmax(T["s"], dim=-1)
    elif op == "layernorm":
        out = layernorm(T["x"], T["w"], T["b"])
    elif op == "gelu":
        out = F.gelu(T["x"], approximate="tanh")
    elif op == "linear":
        out = T["x"] @ T["w"] + T["b"]
    elif op == "cross-entropy":
        out = F.cross_entropy(T["h"] @ T["w"].T, torch.tensor(m["targets"]), ignore_index=IGNORE_INDEX)
    elif op == "block":
        out = torch_block(T["x"], "h.0.")
    elif op == "rmsnorm":
        out = rmsnorm(T["x"], T["w"])
    elif op == "rope":
        out = rope(T["qkv"])
    elif op == "swiglu":
        out = swiglu(T["gu"])
    elif op == "qk_norm":
        out = qk_norm(T["qkv"], T["wq"], T["wk"])
    elif op == "llama-block":
        out = torch_llama_block(T["x"], "layers.0.")
    else:  # model
        x = T["wte.weight"][torch.tensor(m["tokens"])] + T["wpe.weight"][positions]
        for i in range(m["cfg"].n_layers):
            x = torch_block(x, f"h.{i}.")
        logits = layernorm(x, T["ln_f.weight"], T["ln_f.bias"]) @ T["lm_head.weight"].T
        out = F.cross_entropy(logits, torch.tensor(m["targets"]), ignore_index=IGNORE_INDEX)
    out.backward(torch.as_tensor(np.asarray(s.dout, dtype=np.float64)))
    grads = {n: t.grad.numpy() for n, t in T.items()}
    grads.update({n: [t.grad.numpy() for t in ts] for n, ts in kept.items()})
    for n, g in grads.items():
        s.checks.append(Check(f"autograd: d{n}", rel_error(s.grads[n], g), TORCH_TOL))
    return grads


# ---- the update, and the whole training step, against PyTorch (`study adamw`, `study step`) -----------
PEER_OPS = ("adamw", "step")   # walks beside PyTorch: they import torch
ADAMW = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}  # torch.optim.AdamW's, larger lr
ADAMW_STEPS = 3     # step 1 alone hides the bias correction of m (m / (1 - b1) = g exactly)
TRAIN_STEPS = 2     # study step: the second step starts from the first's moments and weights


def _torch():
    try:
        import torch
    except ImportError:
        raise MinisftError("study: adamw and step run beside PyTorch: pip install 'minisft[torch]'") from None
    return torch


def adamw_walk(seed=0) -> tuple:
    """AdamW on one (3, 4) tensor for ADAMW_STEPS steps of random gradients, each step's lines printed
    with its values; checked against minisft's adamw_step kernel and torch.optim.AdamW. -> (lines, checks)."""
    torch = _torch()
    rng = np.random.default_rng(seed)
    lr, (b1, b2), eps, wd = ADAMW["lr"], ADAMW["betas"], ADAMW["eps"], ADAMW["weight_decay"]
    p0 = rng.normal(size=(3, 4))
    grads = [rng.normal(size=p0.shape) for _ in range(ADAMW_STEPS)]
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    kp, km, kv = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)   # minisft's kernel, in place
    tp = torch.nn.Parameter(torch.tensor(p0))
    topt = torch.optim.AdamW([tp], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    lp = torch.nn.Parameter(torch.tensor(p0))  # Adam with L2: wd p added to the gradient, decayed by the moments
    lopt = torch.optim.Adam([lp], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    lines = [f"minisft study adamw: AdamW on p (3, 4), lr={lr:g}, betas=({b1:g}, {b2:g}), eps={eps:g}, "
             f"weight_decay={wd:g}, {ADAMW_STEPS} steps of random gradients g, in PyTorch's order of operations",
             "", "p", *_array_lines(p0, "    ")]
    checks = []
    for t, g in enumerate(grads, 1):
        stages = []
        p = p * (1 - lr * wd)
        stages.append(("p", "p = p (1 - lr wd)   decoupled weight decay: before, and apart from, the moments", p))
        m = b1 * m + (1 - b1) * g
        stages.append(("m", "m = b1 m + (1 - b1) g", m))
        v = b2 * v + (1 - b2) * g * g
        stages.append(("v", "v = b2 v + (1 - b2) g^2", v))
        mhat = m / (1 - b1 ** t)
        stages.append(("mhat", f"mhat = m / (1 - b1^{t})   bias correction: m started at 0", mhat))
        denom = np.sqrt(v) / math.sqrt(1 - b2 ** t) + eps
        stages.append(("denom", f"denom = sqrt(v) / sqrt(1 - b2^{t}) + eps   (eps after the correction)", denom))
        p = p - lr * mhat / denom
        stages.append(("p", "p = p - lr mhat / denom", p))
        nb.NumpyBackend("float64").adamw_step(kp, g, km, kv, lr, b1, b2, eps, wd, t)
        tp.grad, lp.grad = torch.tensor(g), torch.tensor(g)
        topt.step()
        lopt.step()
        lines += ["", f"step {t}", "  g", *_array_lines(g, "      ")]
        for i, (name, text, value) in enumerate(stages, 1):
            lines += [f"  [{i}] {name:<6} {text}", *_array_lines(value, "      ")]
        step_checks = [Check(f"step {t}: p = minisft's adamw_step", rel_error(kp, p), SAME_TOL),
                       Check(f"step {t}: p = torch.optim.AdamW", rel_error(tp.detach().numpy(), p), TORCH_TOL)]
        lines += [f"  {c.what:<40} error {c.err:.1e} (<= {c.tol:g}) {'ok' if c.ok else 'FAILED'}" for c in step_checks]
        lines.append(f"  (Adam with L2, torch.optim.Adam(weight_decay={wd:g}), is another optimizer: its p differs "
                     f"by {rel_error(lp.detach().numpy(), p):.1e})")
        checks += step_checks
    return lines + _summary(checks), checks


def _summary(checks) -> list:
    failed = [c for c in checks if not c.ok]
    return ["", f"{len(checks) - len(failed)} of {len(checks)} checks passed" +
            ("" if not failed else "; FAILED: " + ", ".join(c.what for c in failed))]


def step_walk(seed=0, lengths=(4, 3), heads=GPT2_SHAPE[0], head_dim=GPT2_SHAPE[1]) -> tuple:
    """TRAIN_STEPS training steps of the model study's tiny GPT, minisft's (GPT.forward_backward, AdamW)
    beside PyTorch's (peer.TorchGPT on the sequences padded, autograd, torch.optim.AdamW), in float64:
    the loss, every gradient and every updated weight compared. -> (lines, checks)."""
    torch = _torch()
    from .model import GPT
    from .optim import AdamW
    from .peer import TorchGPT
    lengths = [int(L) for L in lengths]
    validate("model", lengths, heads, head_dim, None)
    rng = np.random.default_rng(seed)
    cfg, N, V = _tiny_config(lengths, heads, head_dim, MODEL_LAYERS), sum(lengths), VOCAB
    params = _params(rng, cfg)
    tokens, targets, positions, cu = _tokens(rng, N, V), _targets(rng, lengths, V), _positions(lengths), _cu(lengths)
    ours = GPT(cfg, backend=nb.NumpyBackend("float64"), params={n: a.copy() for n, a in params.items()})
    opt = AdamW(ours, lr=ADAMW["lr"], betas=ADAMW["betas"], eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"])
    peer = TorchGPT(cfg, dtype=torch.float64)
    peer.load_numpy(params)
    topt = torch.optim.AdamW(peer.parameters(), **ADAMW)
    # the peer's (S, L_max) rows: each sequence padded after its end, the pads' targets ignored; causal
    # attention never lets a real position read a later pad, so the loss and gradients are the packed ones'
    idx = np.zeros((len(lengths), max(lengths)), dtype=np.int64)
    tgt = np.full(idx.shape, IGNORE_INDEX)
    for i, (a, e) in enumerate(zip(cu[:-1], cu[1:])):
        idx[i, :e - a], tgt[i, :e - a] = tokens[a:e], targets[a:e]
    batch = PackedBatch(tokens, targets, positions, cu)
    names = sorted(params)

    def worst(a, b):  # the tensor where ours and PyTorch's differ most
        return max(names, key=lambda n: rel_error(a[n], b[n]))
    lines = [f"minisft study step: {TRAIN_STEPS} training steps of the model study's GPT ({cfg.n_layers} blocks, "
             f"d={cfg.emb_dim}, H={heads}, V={V}, {len(params)} tensors), packed lengths "
             f"{', '.join(map(str, lengths))}, "
             f"tokens {tokens.tolist()}, targets {targets.tolist()}; AdamW lr={ADAMW['lr']:g}, weight_decay="
             f"{ADAMW['weight_decay']:g} on every tensor; beside PyTorch: peer.TorchGPT on the sequences padded to "
             f"(S, L) = {idx.shape}, autograd and torch.optim.AdamW, float64"]
    checks = []
    for t in range(1, TRAIN_STEPS + 1):
        ours.zero_grad()
        loss_sum, M = ours.forward_backward(batch)
        grads = {n: ours.B.to_numpy(g) for n, g in ours.grads.items()}
        opt.step()
        topt.zero_grad()
        loss = peer.loss(torch.tensor(idx), torch.tensor(tgt))
        loss.backward()
        tgrads = peer.grads_numpy()
        topt.step()
        tparams = {n: peer.P(n).detach().numpy() for n in params}
        step_checks = [
            (Check(f"step {t}: forward, the loss", rel_error(loss_sum / M, loss.item()), TORCH_TOL),
             f"loss = mean cross-entropy over the {M} targets = {loss_sum / M:.6f}"),
            (Check(f"step {t}: backward, every gradient", rel_error([grads[n] for n in names],
                                                                    [tgrads[n] for n in names]), TORCH_TOL),
             f"all {len(names)} gradients (worst tensor: {worst(grads, tgrads)})"),
            (Check(f"step {t}: update, every weight", rel_error([ours.params[n] for n in names],
                                                                [tparams[n] for n in names]), TORCH_TOL),
             f"all {len(names)} weights after AdamW (worst tensor: {worst(ours.params, tparams)})")]
        lines += ["", f"step {t}"]
        lines += [f"  {c.what.split(': ')[1]:<24} {text}: ours vs PyTorch error {c.err:.1e} (<= {c.tol:g}) "
                  f"{'ok' if c.ok else 'FAILED'}" for c, text in step_checks]
        checks += [c for c, _ in step_checks]
    return lines + _summary(checks), checks
