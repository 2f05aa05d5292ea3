"""What `minisft data stats` reports of a dataset before training on it: records and turns, the
book's split, tokens per record, and the records that would surprise a run (too long, duplicated,
a val or test prompt also in train, a literal end-of-text string)."""
from dataclasses import dataclass

import numpy as np

from .data import encode_records, split_dataset
from .prompts import PromptStyle


@dataclass
class DataStats:
    records: int
    single_turn: int            # records with one assistant turn
    multi_turn: int             # records with more
    with_system: int            # records that open with a system message
    alpaca_inputs: int          # turns with an Alpaca input
    split: dict                 # {"train": n, "val": n, "test": n}: the book's 85/10/5 split
    lengths: np.ndarray         # (n,) tokens per record (training text, before the appended end-of-text)
    tokens: dict                # {"min", "median", "mean", "max"} of lengths
    longer: int                 # records with more tokens than the limit given (truncated in training)
    duplicates: int             # records with the same training text as an earlier record
    in_train: dict              # {"val": n, "test": n}: records whose prompt is also a train record's
    literal_eot: int            # records whose text holds '<|endoftext|>' (tokenized as plain text)


def user_text(record) -> str:
    """All user-side text of a record, normalised (case, whitespace) to compare prompts."""
    parts = [m["content"] + " " + m.get("input", "") for m in record["messages"] if m["role"] == "user"]
    return " ".join(" ".join(parts).casefold().split())


def data_stats(records, style: PromptStyle, limit, shuffle_seed=None) -> DataStats:
    """The statistics of validated records rendered in `style`; `limit` is the most tokens a record
    may have before training truncates it."""
    lengths = np.array([len(e.tokens) for e in encode_records(records, style)])  # (n,)
    turns = np.array([sum(m["role"] == "assistant" for m in r["messages"]) for r in records])  # (n,)
    texts = [style.training_text(r["messages"]) for r in records]
    split = split_dataset(range(len(records)), shuffle_seed=shuffle_seed)
    train_prompts = {user_text(records[i]) for i in split.train}
    return DataStats(
        records=len(records), single_turn=int(np.sum(turns == 1)), multi_turn=int(np.sum(turns > 1)),
        with_system=sum(r["messages"][0]["role"] == "system" for r in records),
        alpaca_inputs=sum(bool(m.get("input")) for r in records for m in r["messages"]),
        split={name: len(getattr(split, name)) for name in ("train", "val", "test")},
        lengths=lengths, tokens={"min": int(lengths.min()), "median": int(np.median(lengths)),
                                 "mean": float(lengths.mean()), "max": int(lengths.max())},
        longer=int(np.sum(lengths > limit)), duplicates=len(texts) - len(set(texts)),
        in_train={name: sum(user_text(records[i]) in train_prompts for i in getattr(split, name))
                  for name in ("val", "test")},
        literal_eot=sum("<|endoftext|>" in t for t in texts))


def histogram(values, bins=10, width=40) -> list:
    """Text lines of a histogram of integer values, in at most `bins` equal integer ranges."""
    values = np.asarray(values)
    lo = int(values.min())
    step = -(-(int(values.max()) - lo + 1) // bins)  # ceil: every value lands in a bin
    counts = np.bincount((values - lo) // step)
    bars = ["#" * round(width * c / counts.max()) for c in counts]
    return [f"  {lo + i * step:6d} - {lo + (i + 1) * step - 1:6d} | {bar:<{width}} {c}"
            for i, (bar, c) in enumerate(zip(bars, counts))]
