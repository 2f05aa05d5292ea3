"""AdamW (decoupled weight decay, as torch.optim.AdamW), global-norm gradient clipping and the
learning-rate schedules.

The update itself is a backend kernel (`adamw_step`); this module holds the state (m, v, step) and
decides which tensors decay.

The moments can be kept lean (`state`): "fp32" holds them like the weights (8 bytes per trained
parameter), "bf16" as stochastically rounded bfloat16 (4 bytes), "8bit" block-wise quantized (2 bytes
+ 8 bytes per block of 2048), each a format object of backends/optim_state.py (the number formats are
in backends/quant.py). Lean state needs float32 master weights (dtype float32, or bfloat16 mixed
precision); the update always runs in float32.
"""
import math

import numpy as np

from .backends.optim_state import DEFAULT, FORMATS, OPTIM_STATES
from .config import check_tensors
from .model import GPT

DECAY_CHOICES = ("all", "matrices")


def decays(name: str, shape, decay: str) -> bool:
    """Whether weight decay applies to a parameter. "all" is the book's recipe (every tensor);
    "matrices" decays only the linear/head weights: no biases, layernorm gains or embeddings."""
    if decay == "all":
        return True
    return len(shape) == 2 and name not in ("wte.weight", "wpe.weight")


def state_layout(shapes: dict, state: str, array_dtype) -> dict:
    """group -> {name: (shape, numpy dtype)} of AdamW's arrays as stored, for trained tensors of the
    given shapes: fp32 moments like the weights (array_dtype), lean ones as they are held."""
    fmt = FORMATS[state]
    layouts = {n: fmt.layout(s, array_dtype) for n, s in shapes.items()}
    return {k: {n: layouts[n][k] for n in shapes} for k in fmt.groups}


class AdamW:
    def __init__(self, model: GPT, lr=5e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, decay="all",
                 state=DEFAULT):
        if decay not in DECAY_CHOICES:
            raise ValueError(f"AdamW decay must be one of {DECAY_CHOICES}, got {decay!r}")
        if state not in OPTIM_STATES:
            raise ValueError(f"AdamW state must be one of {OPTIM_STATES}, got {state!r}")
        if FORMATS[state].lean and model.dtype == "float64":
            raise ValueError(f"AdamW state {state!r} needs float32 master weights, not {model.dtype}")
        if lr < 0 or weight_decay < 0 or eps <= 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamW: invalid hyperparameters lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        self.model, self.lr, self.betas, self.eps = model, lr, tuple(betas), eps
        self.weight_decay, self.decay = weight_decay, decay
        self.state, self.format = state, FORMATS[state]  # the setting's name (checkpoints record it), its format
        trained = [n for n in model.params if n not in model.frozen]
        zeros = {n: self.format.zeros(model.B, model.params[n]) for n in trained}
        # group -> {name: array}: m and v (first and second moments; 8-bit: their codes, and m_scale, v_scale)
        self.moments = {k: {n: zeros[n][k] for n in trained} for k in self.format.groups}
        self.keys = {n: k for k, n in enumerate(trained)}  # each tensor's number in the bf16 rounding hash
        self.step_count = 0

    @property
    def m(self) -> dict:
        return self.moments["m"]

    @property
    def v(self) -> dict:
        return self.moments["v"]

    def step(self, grads=None, lr=None) -> None:
        """One update of every trained parameter. grads: {name: numpy array} or None for the
        model's own accumulated gradients; lr overrides self.lr for this step (schedules)."""
        B = self.model.B
        if grads is None:
            grads = self.model.grads
        else:
            grads = {n: B.from_numpy(g) for n, g in grads.items()}
        missing = [n for n in self.m if n not in grads]
        if missing:
            raise ValueError(f"AdamW.step: no gradient for {missing[:5]}")
        self.step_count += 1
        for n in self.m:
            self._update(n, grads[n], self.lr if lr is None else lr)

    def _update(self, n, g, lr) -> None:
        """The update of tensor n by its gradient g, at step self.step_count."""
        P, (b1, b2) = self.model.params, self.betas
        wd = self.weight_decay if decays(n, P[n].shape, self.decay) else 0.0
        self.format.step(self.model.B, P[n], g, {k: a[n] for k, a in self.moments.items()},
                         lr, b1, b2, self.eps, wd, self.step_count, self.keys[n])

    def fused_step(self, batch, lr=None) -> tuple[float, float]:
        """Forward, backward and update in one pass: each trained tensor is updated as soon as its
        gradient is complete in the backward, and that gradient is dropped, so no full set of
        gradients is ever held. The result is step()'s after forward_backward (the same kernels on the
        same gradients), for one micro-batch and no clipping (clipping needs the global norm first).
        Returns (mean loss, gradient norm). An error mid-backward leaves some tensors updated."""
        B, sumsq = self.model.B, []
        self.model.zero_grad()
        self.step_count += 1

        def update(name, g):
            if name in self.m:
                sumsq.append(B.global_norm([g]) ** 2)
                self._update(name, g, self.lr if lr is None else lr)
        self.model.on_grad = update
        try:
            loss_sum, n_valid = self.model.forward_backward(batch)
        finally:
            self.model.on_grad = None
        return loss_sum / n_valid, math.sqrt(sum(sumsq))

    def to_host(self, a) -> np.ndarray:
        """One state array as numpy, exactly (bfloat16 as its uint16 bits)."""
        return self.format.to_host(self.model.B, a)

    def from_host(self, a: np.ndarray):
        return self.format.from_host(self.model.B, a)

    def state_dict(self) -> dict:
        return {"step": self.step_count, "state": self.state,
                **{k: {n: self.to_host(a) for n, a in g.items()} for k, g in self.moments.items()}}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("state", DEFAULT) != self.state:
            raise ValueError(f"AdamW state is {sd.get('state', DEFAULT)!r}, this optimizer keeps {self.state!r}")
        for key, g in self.moments.items():
            check_tensors(f"AdamW state {key!r}", {n: a.shape for n, a in sd[key].items()},
                          {n: tuple(a.shape) for n, a in g.items()})
        for key, g in self.moments.items():
            g.update({n: self.from_host(a) for n, a in sd[key].items()})
        self.step_count = int(sd["step"])


def clip_grad_norm(model: GPT, max_norm: float | None) -> float:
    """Global L2 norm of the model's gradients; when max_norm is set and exceeded, scale every
    gradient by max_norm / (norm + 1e-6) as torch.nn.utils.clip_grad_norm_ does. Returns the norm
    before clipping."""
    grads = list(model.grads.values())
    norm = model.B.global_norm(grads)
    if max_norm is not None and norm > max_norm:
        model.B.scale_(grads, max_norm / (norm + 1e-6))
    return norm


# ---- learning-rate schedules -------------------------------------------------------------------------
# Linear warmup, then constant, linear decay or cosine decay to min_lr. `lr_at(step, ...)` takes the
# 1-based optimizer step (the step about to be applied), so step 1 of a 100-step warmup runs at lr/100
# and step `warmup_steps` at the full lr. Decay runs from the end of warmup to `total_steps`, where it
# reaches min_lr.
SCHEDULES = ("constant", "linear", "cosine")


def lr_at(step: int, lr: float, schedule: str = "constant", warmup_steps: int = 0,
          total_steps: int | None = None, min_lr: float = 0.0) -> float:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if step <= warmup_steps:
        return lr * step / warmup_steps
    if schedule == "constant":
        return lr
    if total_steps is None:
        raise ValueError(f"the {schedule} schedule needs the total number of steps")
    span = max(total_steps - warmup_steps, 1)
    frac = min((step - warmup_steps) / span, 1.0)   # 0 just after warmup, 1 at the last step
    if schedule == "linear":
        return min_lr + (lr - min_lr) * (1.0 - frac)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))
