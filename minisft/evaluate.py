"""Held-out loss and perplexity, weighted by token: every valid target counts once, however the
targets are split into batches (a mean of per-batch means would overweight short batches)."""
import math

from .errors import MinisftError


class NoTargets(MinisftError):
    """Every batch had every target masked or cut off: there is no loss to report."""


def evaluate_loss(model, batches) -> tuple[float, float, int]:
    """batches: an iterable of PackedBatch (wrap it in tqdm for a progress bar).
    -> (mean loss per valid target, perplexity = exp(mean loss), number of valid targets)."""
    loss_sum, n_valid = 0.0, 0
    for batch in batches:
        if batch.num_valid == 0:
            continue
        s, n = model.loss(batch)
        loss_sum += s
        n_valid += n
    if n_valid == 0:
        raise NoTargets("evaluate_loss: no valid targets in any batch")
    mean = loss_sum / n_valid
    return mean, math.exp(mean), n_valid
