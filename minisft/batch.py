"""The packed token layout every backend kernel works on.

A batch is one flat stream of N positions holding S sequences back to back:

    tokens     (N,)   token ids
    targets    (N,)   next-token ids, -100 where no loss is taken
    positions  (N,)   0, 1, 2, ... restarting at every sequence start
    cu_seqlens (S+1,) offsets: sequence s is tokens[cu_seqlens[s]:cu_seqlens[s+1]]

Attention never crosses a sequence boundary. A padded (B, T) batch is the special case of B
sequences of length T; `pack_padded` turns one into the padding-free form by dropping each row's
trailing positions that carry no target (causal attention means no earlier position ever saw them,
so loss and gradients are unchanged while the work shrinks).
"""
from dataclasses import dataclass

import numpy as np

from .backends.constants import IGNORE_INDEX  # noqa: F401 (the batch layout's name for it)


@dataclass(frozen=True)
class PackedBatch:
    tokens: np.ndarray      # (N,) int64
    targets: np.ndarray     # (N,) int64, IGNORE_INDEX = no loss
    positions: np.ndarray   # (N,) int64
    cu_seqlens: np.ndarray  # (S+1,) int64, cu_seqlens[0] == 0, cu_seqlens[-1] == N

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.cu_seqlens.shape[0] - 1)

    @property
    def num_valid(self) -> int:
        """Positions that contribute to the loss."""
        return int(np.count_nonzero(self.targets != IGNORE_INDEX))

    def max_seqlen(self) -> int:
        return int(np.diff(self.cu_seqlens).max(initial=0))


def pack_sequences(inputs, targets=None) -> PackedBatch:
    """Concatenate variable-length sequences into one PackedBatch.

    inputs: list of 1-D int sequences; targets: a list of the same lengths, or None (all ignored,
    for inference).
    """
    lengths = [len(seq) for seq in inputs]
    if targets is None:
        targets = [np.full(n, IGNORE_INDEX) for n in lengths]
    if [len(t) for t in targets] != lengths:
        raise ValueError("pack_sequences: every targets row must have the length of its inputs row")
    cu_seqlens = np.zeros(len(lengths) + 1, dtype=np.int64)  # (S+1,)
    np.cumsum(lengths, out=cu_seqlens[1:])
    n = int(cu_seqlens[-1])
    tokens = np.concatenate([np.asarray(s, dtype=np.int64) for s in inputs]) if n else np.zeros(0, np.int64)
    tgts = np.concatenate([np.asarray(t, dtype=np.int64) for t in targets]) if n else np.zeros(0, np.int64)
    starts = np.repeat(cu_seqlens[:-1], lengths)  # (N,) start offset of each position's sequence
    positions = np.arange(n, dtype=np.int64) - starts  # (N,)
    return PackedBatch(tokens, tgts, positions, cu_seqlens)


def pack_padded(inputs: np.ndarray, targets: np.ndarray, strip: bool = True) -> PackedBatch:
    """(B, T) padded inputs/targets -> PackedBatch.

    strip=True drops each row's trailing positions whose target is IGNORE_INDEX (the book's padding
    after the first end-of-text) and rows left empty; strip=False keeps B sequences of length T.
    """
    inputs = np.asarray(inputs, dtype=np.int64)    # (B, T)
    targets = np.asarray(targets, dtype=np.int64)  # (B, T)
    if inputs.ndim != 2 or inputs.shape != targets.shape:
        raise ValueError(f"pack_padded: inputs {inputs.shape} and targets {targets.shape} must be equal (B, T)")
    if not strip:
        return pack_sequences(list(inputs), list(targets))
    rows_in, rows_tg = [], []
    for x, y in zip(inputs, targets):
        valid = np.flatnonzero(y != IGNORE_INDEX)
        if valid.size:
            keep = valid[-1] + 1
            rows_in.append(x[:keep])
            rows_tg.append(y[:keep])
    return pack_sequences(rows_in, rows_tg)
