"""Learning-rate schedules: linear warmup, then constant, linear decay or cosine decay to min_lr.

`lr_at(step, ...)` takes the 1-based optimizer step (the step about to be applied), so step 1 of a
100-step warmup runs at lr/100 and step `warmup_steps` at the full lr. Decay runs from the end of
warmup to `total_steps`, where it reaches min_lr.
"""
import math

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
