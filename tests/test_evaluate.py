"""Token-weighted evaluation loss: equal to the mean cross-entropy over every valid target, computed
directly from the logits in float64, however the targets are split into batches (<= 1e-12 relative)."""
import math

import numpy as np
import pytest

from minisft import GPT, GPTConfig, pack_sequences
from minisft.batch import IGNORE_INDEX
from minisft.evaluate import evaluate_loss


def test_loss_is_weighted_by_token_not_by_batch():
    model = GPT(GPTConfig(vocab_size=29, context_length=16, emb_dim=8, n_layers=2, n_heads=2),
                dtype="float64", seed=1)
    rng = np.random.default_rng(0)
    lengths = [3, 14, 7, 1, 9]
    inputs = [rng.integers(0, 29, n) for n in lengths]
    targets = [rng.integers(0, 29, n) for n in lengths]
    for t in targets:
        t[rng.random(len(t)) < 0.3] = IGNORE_INDEX
    targets[3][:] = IGNORE_INDEX  # a sequence with nothing to score

    # Direct: log-softmax of every sequence's logits at its valid targets.
    nll = []
    for x, y in zip(inputs, targets):
        z = model.logits(x[None])[0]                                     # (L, V)
        lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
        nll += [lse[i] - z[i, y[i]] for i in np.flatnonzero(y != IGNORE_INDEX)]
    expect = float(np.mean(nll))

    # Uneven batches (one with no valid target at all): a per-batch mean would differ.
    batches = [pack_sequences(inputs[:1], targets[:1]), pack_sequences(inputs[1:3], targets[1:3]),
               pack_sequences(inputs[3:4], targets[3:4]), pack_sequences(inputs[4:], targets[4:])]
    loss, ppl, n = evaluate_loss(model, iter(batches))
    assert n == len(nll)
    assert abs(loss - expect) <= 1e-12 * expect
    assert abs(ppl - math.exp(expect)) <= 1e-12 * math.exp(expect)
    per_batch = np.mean([model.loss(b)[0] / model.loss(b)[1] for b in batches if b.num_valid])
    assert abs(per_batch - expect) > 1e-3  # the test can tell the two apart

    with pytest.raises(ValueError, match="no valid targets"):
        evaluate_loss(model, [batches[2]])
