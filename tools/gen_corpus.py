"""A generated Alpaca corpus for benchmarking `minisft data clean`, with known problems planted.

    python tools/gen_corpus.py --records 100000 --out /tmp/corpus-100k.json [--eval-out /tmp/eval.json]

Words come from a Zipf-distributed vocabulary of random letter strings (so the text tokenizes like
real words: about 2.5 GPT-2 tokens each); instruction 8-20 words, an input on a third of the
records, outputs 10-80 words. Planted, at random positions after their source: exact duplicates
(3%, case and punctuation changed), near duplicates (5%, one or two words changed), empty outputs
(1%), boilerplate (1%), over-long outputs (0.5%, 600 words), control characters (0.5%), and
records copied from the evaluation file (1%). Prints how many of each were planted.
"""
import argparse
import json

import numpy as np

LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


def vocabulary(rng, size):
    return ["".join(rng.choice(LETTERS, rng.integers(2, 10))) for _ in range(size)]


def text(rng, vocab, lo, hi):
    n = rng.integers(lo, hi + 1)
    ids = np.minimum(rng.zipf(1.3, n) - 1, len(vocab) - 1)
    return " ".join(vocab[i] for i in ids).capitalize() + "."


def record(rng, vocab):
    return {"instruction": text(rng, vocab, 8, 20), "input": text(rng, vocab, 5, 15) if rng.random() < 1 / 3 else "",
            "output": text(rng, vocab, 10, 80)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--eval-out", default=None, help="also write the evaluation file (1000 records)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    vocab = vocabulary(rng, 20000)
    evals = [record(rng, vocab) for _ in range(1000)]
    recs = [record(rng, vocab) for _ in range(args.records)]
    kinds = rng.choice(["exact", "near", "empty", "boilerplate", "long", "control", "contaminated", "clean"],
                       size=args.records, p=[0.03, 0.05, 0.01, 0.01, 0.005, 0.005, 0.01, 0.88])
    kinds[0] = "clean"
    planted = {}
    for i, kind in enumerate(kinds):
        src = recs[rng.integers(i)] if i else None
        if kind == "exact":
            recs[i] = {**src, "instruction": src["instruction"].upper().replace(".", "!")}
        elif kind == "near":
            ws = src["output"].split()
            for j in rng.choice(len(ws), size=min(len(ws), rng.integers(1, 3)), replace=False):
                ws[j] = vocab[rng.integers(len(vocab))]
            recs[i] = {**src, "output": " ".join(ws)}
        elif kind == "empty":
            recs[i]["output"] = " "
        elif kind == "boilerplate":
            recs[i]["output"] = "As an AI language model, " + recs[i]["output"]
        elif kind == "long":
            recs[i]["output"] = " ".join(text(rng, vocab, 600, 600) for _ in range(1))
        elif kind == "control":
            recs[i]["output"] = recs[i]["output"] + "\x00"
        elif kind == "contaminated":
            recs[i] = {k: v.title() for k, v in evals[rng.integers(len(evals))].items()}
        planted[kind] = planted.get(kind, 0) + 1
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(recs, f, indent=4)
    if args.eval_out:
        with open(args.eval_out, "w", encoding="utf-8") as f:
            json.dump(evals, f, indent=4)
    print(json.dumps({"records": args.records, "planted": planted}))


if __name__ == "__main__":
    main()
