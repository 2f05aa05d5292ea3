"""AdamW (decoupled weight decay, as torch.optim.AdamW), global-norm gradient clipping and the
learning-rate schedules.

The update itself is a backend kernel (`adamw_step`); this module holds the state (m, v, step) and
decides which tensors decay.
"""
import math

from .config import check_tensors
from .model import GPT

DECAY_CHOICES = ("all", "matrices")


def decays(name: str, shape, decay: str) -> bool:
    """Whether weight decay applies to a parameter. "all" is the book's recipe (every tensor);
    "matrices" decays only the linear/head weights: no biases, layernorm gains or embeddings."""
    if decay == "all":
        return True
    return len(shape) == 2 and name not in ("wte.weight", "wpe.weight")


class AdamW:
    def __init__(self, model: GPT, lr=5e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, decay="all"):
        if decay not in DECAY_CHOICES:
            raise ValueError(f"AdamW decay must be one of {DECAY_CHOICES}, got {decay!r}")
        if lr < 0 or weight_decay < 0 or eps <= 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamW: invalid hyperparameters lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        self.model, self.lr, self.betas, self.eps = model, lr, tuple(betas), eps
        self.weight_decay, self.decay = weight_decay, decay
        B = model.B
        trained = [n for n in model.params if n not in model.frozen]
        self.m = {n: B.zeros_like(model.params[n]) for n in trained}  # first moments
        self.v = {n: B.zeros_like(model.params[n]) for n in trained}  # second moments
        self.step_count = 0

    def step(self, grads=None, lr=None) -> None:
        """One update of every trained parameter. grads: {name: numpy array} or None for the
        model's own accumulated gradients; lr overrides self.lr for this step (schedules)."""
        B, P = self.model.B, self.model.params
        if grads is None:
            grads = self.model.grads
        else:
            grads = {n: B.from_numpy(g) for n, g in grads.items()}
        missing = [n for n in self.m if n not in grads]
        if missing:
            raise ValueError(f"AdamW.step: no gradient for {missing[:5]}")
        self.step_count += 1
        lr = self.lr if lr is None else lr
        for n in self.m:
            wd = self.weight_decay if decays(n, P[n].shape, self.decay) else 0.0
            B.adamw_step(P[n], grads[n], self.m[n], self.v[n], lr, self.betas[0], self.betas[1],
                         self.eps, wd, self.step_count)

    def state_dict(self) -> dict:
        B = self.model.B
        return {"step": self.step_count,
                "m": {n: B.to_numpy(a) for n, a in self.m.items()},
                "v": {n: B.to_numpy(a) for n, a in self.v.items()}}

    def load_state_dict(self, sd: dict) -> None:
        B = self.model.B
        for key in ("m", "v"):
            check_tensors(f"AdamW state {key!r}", {n: a.shape for n, a in sd[key].items()},
                          {n: self.m[n].shape for n in self.m})
        self.m = {n: B.from_numpy(a) for n, a in sd["m"].items()}
        self.v = {n: B.from_numpy(a) for n, a in sd["v"].items()}
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
