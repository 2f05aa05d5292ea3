"""AdamW (decoupled weight decay, as torch.optim.AdamW), global-norm gradient clipping and the
learning-rate schedules.

The update itself is a backend kernel (`adamw_step`); this module holds the state (m, v, step) and
decides which tensors decay.

The moments can be kept lean (`state`): "fp32" holds them like the weights (8 bytes per trained
parameter), "bf16" as stochastically rounded bfloat16 (4 bytes), "8bit" block-wise quantized (2 bytes
+ 8 bytes per block of 2048); the formats are in backends/quant.py. Lean state needs float32 master
weights (dtype float32, or torch's bfloat16 mixed precision); the update always runs in float32.
"""
import math

import numpy as np

from .backends.quant import OPTIM_STATES, n_blocks
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
    if state == "fp32":
        return {k: {n: (tuple(s), np.dtype(array_dtype)) for n, s in shapes.items()} for k in ("m", "v")}
    size = {n: math.prod(s) for n, s in shapes.items()}
    code = np.dtype(np.uint16 if state == "bf16" else np.uint8)
    out = {k: {n: ((size[n],), code) for n in shapes} for k in ("m", "v")}
    if state == "8bit":
        out.update({k: {n: ((n_blocks(size[n]),), np.dtype(np.float32)) for n in shapes}
                    for k in ("m_scale", "v_scale")})
    return out


class AdamW:
    def __init__(self, model: GPT, lr=5e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, decay="all",
                 state="fp32"):
        if decay not in DECAY_CHOICES:
            raise ValueError(f"AdamW decay must be one of {DECAY_CHOICES}, got {decay!r}")
        if state not in OPTIM_STATES:
            raise ValueError(f"AdamW state must be one of {OPTIM_STATES}, got {state!r}")
        if state != "fp32" and model.dtype == "float64":
            raise ValueError(f"AdamW state {state!r} needs float32 master weights, not {model.dtype}")
        if lr < 0 or weight_decay < 0 or eps <= 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamW: invalid hyperparameters lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        self.model, self.lr, self.betas, self.eps = model, lr, tuple(betas), eps
        self.weight_decay, self.decay = weight_decay, decay
        B = model.B
        self.state = state
        trained = [n for n in model.params if n not in model.frozen]
        size = {n: math.prod(model.params[n].shape) for n in trained}
        if state == "fp32":
            self.m = {n: B.zeros_like(model.params[n]) for n in trained}  # first moments
            self.v = {n: B.zeros_like(model.params[n]) for n in trained}  # second moments
        else:  # flat (n,): bfloat16 moments, or 8-bit codes of m and sqrt(v)
            kind = "bf16" if state == "bf16" else "u8"
            self.m = {n: B.optim_state_zeros(size[n], kind) for n in trained}
            self.v = {n: B.optim_state_zeros(size[n], kind) for n in trained}
        # 8-bit: each block's scale, (n_blocks,) float32 per tensor; empty otherwise
        scaled = trained if state == "8bit" else []
        self.m_scale = {n: B.optim_state_zeros(n_blocks(size[n]), "scale") for n in scaled}
        self.v_scale = {n: B.optim_state_zeros(n_blocks(size[n]), "scale") for n in scaled}
        self.keys = {n: k for k, n in enumerate(trained)}  # each tensor's number in the bf16 rounding hash
        self.step_count = 0

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
        B, P, (b1, b2) = self.model.B, self.model.params, self.betas
        wd = self.weight_decay if decays(n, P[n].shape, self.decay) else 0.0
        if self.state == "fp32":
            B.adamw_step(P[n], g, self.m[n], self.v[n], lr, b1, b2, self.eps, wd, self.step_count)
        elif self.state == "bf16":  # key: the tensor's number in the rounding hash
            B.adamw_step_bf16(P[n], g, self.m[n], self.v[n], lr, b1, b2, self.eps, wd, self.step_count,
                              self.keys[n])
        else:
            B.adamw_step_8bit(P[n], g, self.m[n], self.m_scale[n], self.v[n], self.v_scale[n],
                              lr, b1, b2, self.eps, wd, self.step_count)

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

    def groups(self) -> dict:
        """The state's arrays by group: m, v (+ m_scale, v_scale for 8-bit), each {name: array}."""
        g = {"m": self.m, "v": self.v}
        return {**g, "m_scale": self.m_scale, "v_scale": self.v_scale} if self.state == "8bit" else g

    def to_host(self, a) -> np.ndarray:
        """One state array as numpy, exactly (bfloat16 as its uint16 bits)."""
        B = self.model.B
        return B.to_numpy(a) if self.state == "fp32" else B.optim_state_to_numpy(a)

    def from_host(self, a: np.ndarray):
        B = self.model.B
        return B.from_numpy(a) if self.state == "fp32" else B.optim_state_from_numpy(a)

    def state_dict(self) -> dict:
        return {"step": self.step_count, "state": self.state,
                **{k: {n: self.to_host(a) for n, a in g.items()} for k, g in self.groups().items()}}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("state", "fp32") != self.state:
            raise ValueError(f"AdamW state is {sd.get('state', 'fp32')!r}, this optimizer keeps {self.state!r}")
        for key, g in self.groups().items():
            check_tensors(f"AdamW state {key!r}", {n: a.shape for n, a in sd[key].items()},
                          {n: tuple(a.shape) for n, a in g.items()})
        for key, g in self.groups().items():
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
