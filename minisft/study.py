"""Backprop through the GPT, one stage at a time, on tiny float64 inputs (`minisft study OP`).

An op is a chain of stages, each one line of math: `out = f(inputs)` forward, and the backward that
undoes it, `d(inputs) = g(dout)`. A study runs the forward stage by stage, draws a random gradient for
the final output, walks the stages in reverse, and checks every stage's backward against central
finite differences of its own forward (with the gradient that actually reached it). Then it checks
the numpy backend's kernel itself: its output and gradients against the stages', and against finite
differences. Every check is norm-relative, in float64.

Values are numpy arrays, or lists of arrays, one per packed sequence (attention works on each
sequence alone, so its per-head intermediates have a different length L per sequence).
"""
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import block, gradcheck
from .backends import numpy_backend as nb
from .backends.constants import LN_EPS
from .batch import IGNORE_INDEX, PackedBatch
from .config import GPTConfig
from .errors import MinisftError
from .gradcheck import FD_EPS, FD_TOL, rel_error

SAME_TOL = 1e-12    # the kernel against the stages: the same math in float64, only reordered
TORCH_TOL = 1e-10   # ours against PyTorch autograd (its own ops, its own order of operations)
PRINT_WHOLE = 48    # arrays of up to this many entries are printed whole, bigger ones summarised
VOCAB = 11          # the tiny vocabulary of the cross-entropy and model studies
D_OUT = 4           # the tiny linear layer's output width
MODEL_LAYERS = 2    # blocks in the model study: one block's output feeds another


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


def _copy(v):
    return [np.array(p) for p in v] if isinstance(v, list) else np.array(v)


def fd_error(f, args, i, grad, dout, rng) -> float:
    """Norm-relative error of grad, the analytic gradient of dot(dout, f(*args)) with respect to args[i],
    against central differences (gradcheck.fd_error) at sampled entries of each part of args[i]."""
    args = [_copy(a) for a in args]
    return gradcheck.fd_error(lambda: _dot(dout, f(*args)), args[i], grad, rng)


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
    checks: list = None
    meta: dict = None       # what the PyTorch side needs: cu_seqlens, heads, targets, ...


def run_study(s: Study, rng) -> Study:
    s.values = dict(s.leaves)
    for st in s.stages:
        s.values[st.out] = st.f(*[s.values[n] for n in st.ins])
    final = s.stages[-1].out
    s.grads, s.local, s.checks, s.adds = {final: s.dout}, {}, [], set()
    for st in reversed(s.stages):
        ins = [s.values[n] for n in st.ins]
        gs = st.df(s.grads[st.out], s.values[st.out], *ins)
        s.local[st.out] = gs
        for n, g in zip(st.ins, gs):
            if n in s.grads:  # a value read by two stages: its gradients add
                s.adds.add((st.out, n))
                s.grads[n] = _add(s.grads[n], g)
            else:
                s.grads[n] = g
        for i, n in enumerate(st.ins):
            s.checks.append(Check(f"{st.out}: d{n}", fd_error(st.f, ins, i, gs[i], s.grads[st.out], rng), FD_TOL))
    k = s.kernel
    kgrads = k.df(s.dout, s.leaves)
    names = list(s.leaves)
    if k.separate:
        s.checks.append(Check(f"{k.name} forward = stages", rel_error(k.f(s.leaves), s.values[final]), SAME_TOL))
        for n in names:
            s.checks.append(Check(f"{k.name} backward = stages: d{n}", rel_error(kgrads[n], s.grads[n]), SAME_TOL))
    leaf_args = [s.leaves[n] for n in names]

    def kernel_f(*args):
        return k.f(dict(zip(names, args)))
    for i, n in enumerate(names):
        s.checks.append(Check(f"{k.name} backward vs finite differences: d{n}",
                              fd_error(kernel_f, leaf_args, i, kgrads[n], s.dout, rng), FD_TOL))
    return s


# ---- the studies ----------------------------------------------------------------------------------
def _cu(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (S+1,)


def attention_study(rng, lengths, H, hd) -> Study:
    B, d, cu = nb.NumpyBackend("float64"), H * hd, _cu(lengths)
    scale = 1.0 / math.sqrt(hd)
    spans = [(int(a), int(e)) for a, e in zip(cu[:-1], cu[1:])]
    N, L_max = int(cu[-1]), max(lengths)

    def head(j, name):  # j = 0, 1, 2: q, k, v are column blocks j*d:(j+1)*d of qkv
        def f(qkv):
            return [block.split_heads(qkv[a:e], H)[j].copy() for a, e in spans]  # (H, L, hd) per sequence

        def df(dh, out, qkv):
            dqkv = np.zeros_like(qkv)                                             # (N, 3d)
            for (a, e), g in zip(spans, dh):
                dqkv[a:e, j * d:(j + 1) * d] = g.transpose(1, 0, 2).reshape(e - a, d)
            return (dqkv,)
        cols = [":d", "d:2d", "2d:"][j]
        return Stage(name, ("qkv",), f"{name} = qkv[:, {cols}] split into H heads, per sequence",
                     f"dqkv[:, {cols}] = d{name} with the heads side by side again", f, df)

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
        return np.concatenate([ys.transpose(1, 0, 2).reshape(-1, d) for ys in y])  # (N, d)

    def out_df(dout, out, y):
        return ([dout[a:e].reshape(e - a, H, hd).transpose(1, 0, 2) for a, e in spans],)

    stages = [
        head(0, "q"), head(1, "k"), head(2, "v"),
        Stage("scores", ("q", "k"), "scores = q @ kT / sqrt(hd)",
              "dq = dscores @ k / sqrt(hd);  dk = dscoresT @ q / sqrt(hd)", scores_f, scores_df),
        Stage("p", ("scores",), "p = softmax(scores with key j > query i set to -inf), row by row",
              "dscores = p * (dp - sum_j(dp * p))   (masked entries: p = 0, no gradient)", p_f, p_df),
        Stage("y", ("p", "v"), "y = p @ v", "dp = dy @ vT;  dv = pT @ dy", y_f, y_df),
        Stage("out", ("y",), "out = y with the heads side by side, the sequences back to back",
              "dy = dout split into heads, per sequence", out_f, out_df),
    ]
    kernel = Kernel("attention_forward/attention_backward",
                    lambda v: B.attention_forward(v["qkv"], cu, H, L_max)[0],
                    lambda g, v: {"qkv": B.attention_backward(g, v["qkv"], *B.attention_forward(v["qkv"], cu, H, L_max),
                                                              cu, H, L_max)})
    qkv = rng.normal(size=(N, 3 * d))
    return Study("attention", f"causal attention over {len(lengths)} packed sequences of lengths "
                 f"{', '.join(map(str, lengths))}: N={N}, H={H}, hd={hd}, d={d}",
                 {"qkv": qkv}, stages, kernel, rng.normal(size=(N, d)))


def softmax_study(rng, lengths, H, hd) -> Study:
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


def layernorm_study(rng, lengths, H, hd) -> Study:
    B, N, d = nb.NumpyBackend("float64"), sum(lengths), H * hd
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


def gelu_study(rng, lengths, H, hd) -> Study:
    B, N, d = nb.NumpyBackend("float64"), sum(lengths), H * hd
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


def linear_study(rng, lengths, H, hd) -> Study:
    B, N, d = nb.NumpyBackend("float64"), sum(lengths), H * hd
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


def _targets(rng, lengths, V):
    """Next-token targets, -100 on each sequence's first position (as a masked prompt would be)."""
    targets = rng.integers(0, V, sum(lengths))
    targets[_cu(lengths)[:-1]] = IGNORE_INDEX
    return targets                                                                       # (N,)


def cross_entropy_study(rng, lengths, H, hd) -> Study:
    B, N, d, V = nb.NumpyBackend("float64"), sum(lengths), H * hd, VOCAB
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
def _block_stages(B, p, x, cu, H, L_max):
    """The stages of one GPT block, minisft.block's list, reading x and parameters named p + HF name,
    each through the numpy backend's kernels as model._block runs them (no dropout).
    Stage names are p + the names of minisft.block."""
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
    return [Stage(p + st.out, tuple(x if n == "x" else p + n for n in st.ins) + block.params(st, p),
                  st.forward, st.backward, *ops[st.op]) for st in block.stages()]


def _tiny_config(lengths, H, hd, n_layers) -> GPTConfig:
    return GPTConfig(vocab_size=VOCAB, context_length=max(lengths), emb_dim=H * hd, n_layers=n_layers, n_heads=H)


def _params(rng, cfg, prefix=""):
    """The parameters named prefix... in model.param_shapes, drawn at the scale of ones (layernorm
    gains near 1), not GPT-2's init, so that every gradient is well away from zero."""
    from .model import param_shapes
    out = {}
    for name, shape in param_shapes(cfg).items():
        if name.startswith(prefix):
            gain = name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
            out[name] = (1.0 if gain else 0.0) + rng.normal(size=shape) * (0.3 if gain else 0.5)
    return out


def block_study(rng, lengths, H, hd) -> Study:
    B, cfg, cu = nb.NumpyBackend("float64"), _tiny_config(lengths, H, hd, 1), _cu(lengths)
    N, d = sum(lengths), H * hd
    leaves = {"x": rng.normal(size=(N, d)), **_params(rng, cfg, "h.0.")}
    stages = _block_stages(B, "h.0.", "x", cu, H, max(lengths))
    names = list(leaves)

    def chain(v):  # the whole block forward from the leaves, for its end-to-end check
        vals = dict(v)
        for st in stages:
            vals[st.out] = st.f(*[vals[n] for n in st.ins])
        return vals[stages[-1].out]

    def chain_grads(g, v):  # the block's backward, stage by stage, as model._backward walks it
        vals, grads = dict(v), {}
        for st in stages:
            vals[st.out] = st.f(*[vals[n] for n in st.ins])
        grads[stages[-1].out] = g
        for st in reversed(stages):
            for n, gi in zip(st.ins, st.df(grads[st.out], vals[st.out], *[vals[n] for n in st.ins])):
                grads[n] = grads[n] + gi if n in grads else gi
        return {n: grads[n] for n in names}
    kernel = Kernel("block (end to end)", chain, chain_grads, separate=False)
    return Study("block", f"one GPT block (pre-layernorm, no dropout): x (N, d) = ({N}, {d}), H={H}, hd={hd}, "
                 f"packed lengths {', '.join(map(str, lengths))}; x feeds ln_1 and the skip, x2 feeds ln_2 and "
                 "the skip: their gradients add", leaves, stages, kernel, rng.normal(size=(N, d)))


def model_study(rng, lengths, H, hd) -> Study:
    from .model import GPT
    B, cfg, cu = nb.NumpyBackend("float64"), _tiny_config(lengths, H, hd, MODEL_LAYERS), _cu(lengths)
    N, V = sum(lengths), VOCAB
    tokens = rng.integers(0, V, N)                                                      # (N,)
    targets = _targets(rng, lengths, V)                                                 # (N,)
    positions = np.concatenate([np.arange(L) for L in lengths])                         # (N,)
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
        stages += _block_stages(B, f"h.{i}.", x, cu, H, max(lengths))
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


STUDIES = {"attention": attention_study, "softmax": softmax_study, "layernorm": layernorm_study,
           "gelu": gelu_study, "linear": linear_study, "cross-entropy": cross_entropy_study,
           "block": block_study, "model": model_study}
OPS = tuple(STUDIES)  # the ops `minisft study` takes, in the order its help lists them


def validate(op, lengths, heads, head_dim) -> None:
    if op not in STUDIES:
        raise MinisftError(f"study: unknown op {op!r}; choose one of {', '.join(OPS)}")
    if not lengths or any(L < 1 for L in lengths):
        raise MinisftError(f"study: --lengths must be positive sequence lengths, got {lengths}")
    if op in ("cross-entropy", "model") and all(L < 2 for L in lengths):
        raise MinisftError("study: --lengths needs a sequence of 2 or more: the first position of each has no target")
    if heads < 1 or head_dim < 1:
        raise MinisftError(f"study: --heads and --head-dim must be positive, got {heads} and {head_dim}")
    if op in ("layernorm", "block", "model") and heads * head_dim < 3:
        # xhat of one or two entries is 0 or +-1 whatever x is: the gradient is only rounding noise
        raise MinisftError("study: a layernorm over d < 3 entries is constant: give --heads x --head-dim of 3 or more")
    if op == "softmax" and lengths[0] < 2:
        raise MinisftError("study: a softmax over 1 entry is constant: the first of --lengths must be 2 or more")


def study(op, seed=0, lengths=(4, 3), heads=2, head_dim=3) -> Study:
    """Build and run the study of op on fresh random inputs drawn from seed."""
    lengths = [int(L) for L in lengths]
    validate(op, lengths, heads, head_dim)
    rng = np.random.default_rng(seed)
    s = STUDIES[op](rng, lengths, heads, head_dim)
    s.meta = {**(s.meta or {}), "lengths": lengths, "heads": heads, "head_dim": head_dim}
    return run_study(s, rng)


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
    return lines


# ---- PyTorch autograd, side by side ---------------------------------------------------------------
def torch_gradients(s: Study) -> dict:
    """PyTorch autograd's gradients of dot(dout, output), computed with PyTorch's own ops (F.layer_norm,
    F.gelu, F.cross_entropy, scaled_dot_product_attention, ...) from the same inputs: {name: gradient}
    for every input, and for attention also its per-head q, k, v, scores and p; each is added to the
    study's checks against our gradient. Imports torch."""
    import torch
    import torch.nn.functional as F
    m = s.meta
    lengths, H = m["lengths"], m["heads"]
    T = {n: torch.tensor(v, dtype=torch.float64, requires_grad=True) for n, v in s.leaves.items()}
    kept = {}

    def keep(name, t):
        t.retain_grad()
        kept.setdefault(name, []).append(t)
        return t

    def layernorm(x, w, b):
        return F.layer_norm(x, (x.shape[-1],), w, b, eps=LN_EPS)

    def attention(qkv, record):
        d = qkv.shape[1] // 3
        outs, a = [], 0
        for L in lengths:
            q, k, v = qkv[a:a + L].view(L, 3, H, d // H).permute(1, 2, 0, 3)      # (H, L, hd) each
            if record:
                q, k, v = keep("q", q), keep("k", k), keep("v", v)
                scores = keep("scores", (q @ k.transpose(1, 2)) / math.sqrt(d // H))
                causal = torch.ones(L, L, dtype=torch.bool).tril()
                y = keep("p", scores.masked_fill(~causal, float("-inf")).softmax(-1)) @ v
            else:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            outs.append(y.transpose(0, 1).reshape(L, d))
            a += L
        return torch.cat(outs)                                                     # (N, d)

    def torch_block(x, p):  # minisft.block's stages, each through PyTorch's own op
        ops = {"layernorm": lambda st, xx: layernorm(xx, *(T[n] for n in block.params(st, p))),
               "linear": lambda st, xx: xx @ T[p + st.module + ".weight"] + T[p + st.module + ".bias"],
               "attention": lambda st, qkv: attention(qkv, False),
               "gelu": lambda st, xx: F.gelu(xx, approximate="tanh"),
               "residual": lambda st, a, b: a + b}
        return block.run(ops, x)

    op = s.op
    if op == "attention":
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
    else:  # model
        positions = torch.tensor(np.concatenate([np.arange(L) for L in lengths]))
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
