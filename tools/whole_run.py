"""Whole-run comparison: 2 epochs of the book's chapter-7 recipe on gpt2-small shapes, minisft numba
padding-free against the book-style PyTorch pipeline (padded batches), wall time of each, the book
loop's evaluations and samples included.

    python tools/whole_run.py                 # time an evenly spaced sample of steps, extrapolate
    python tools/whole_run.py --sample all    # time every step of both runs

The recipe: the 935 training entries of the book's instruction-data.json (its first 85%, unshuffled,
as the book splits), each formatted with the Alpaca prompt and its response, tokenized with the GPT-2
tokenizer; batches of 8 in a fresh random order each epoch, the last partial batch dropped
(116 steps per epoch); the book's collate (end-of-text appended, padded with it to the longest in
the batch, targets shifted by one, -100 on every pad but the first); AdamW lr 5e-5, weight decay 0.1;
dropout 0; random initial weights (timing does not depend on them). Both sides get the same batches.
The book's loop (train_model_simple, eval_freq 5, eval_iter 5) also evaluates after steps 1, 6, 11,
... (the loss on 5 training and 5 validation batches, no gradient) and generates a 50-token greedy
sample from the first validation entry at the end of each epoch; both sides do the same, the book
side with its own generate_text_simple (the whole context again for every token), minisft with
minisft.generate (KV cache).

    book   minisft/peer.py TorchGPT + torch.optim.AdamW on the padded (8, T) batch, as the book
    numba  minisft GPT on the numba backend, the same batch packed without its trailing padding
           (--numba-dtype bfloat16: its mixed-precision bf16 matmuls)

Training steps, evaluations and samples are timed separately and all count in the whole run. Each
side runs in its own process, alternating chunk by chunk so that machine load that drifts hits both;
a process builds its model and takes one untimed warm-up step first (numba's cache load,
first-touch of memory), reported separately as the fixed cost.

The tokenization below is this benchmark's own, minimal on purpose (it is not minisft's data
pipeline): the book's format_input and collate, written out.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minisft import GPT, AdamW, GPTConfig, pack_padded, tokenizer  # noqa: E402
from minisft.batch import IGNORE_INDEX  # noqa: E402
from minisft.data import BUNDLED_DATA  # noqa: E402
from minisft.generate import generate  # noqa: E402

EOT, BATCH, EPOCHS, SEED, LR, WEIGHT_DECAY = 50256, 8, 2, 123, 5e-5, 0.1
EVAL_FREQ, EVAL_ITER, SAMPLE_TOKENS = 5, 5, 50  # the book's train_model_simple arguments in chapter 7


# ---- the benchmark's own minimal data pipeline (the book's format and collate) -------------------
def format_input(entry: dict) -> str:
    text = ("Below is an instruction that describes a task. Write a response that appropriately "
            f"completes the request.\n\n### Instruction:\n{entry['instruction']}")
    return text + (f"\n\n### Input:\n{entry['input']}" if entry["input"] else "")


def token_ids() -> tuple:
    """(train sequences, validation sequences, the first validation entry's prompt), token ids."""
    enc = tokenizer.gpt2()  # tiktoken's "gpt2" encoding, from the bundled vocabulary
    data = json.loads(BUNDLED_DATA.read_text())
    n_train, n_test = int(len(data) * 0.85), int(len(data) * 0.1)  # the book's split, in file order
    train, val = data[:n_train], data[n_train + n_test:]
    full = lambda e: enc.encode(format_input(e) + f"\n\n### Response:\n{e['output']}")  # noqa: E731
    return [full(e) for e in train], [full(e) for e in val], enc.encode(format_input(val[0]))


def collate(seqs):
    """The book's collate: (B, T) inputs and targets, T = longest sequence in the batch."""
    T = max(len(s) for s in seqs) + 1
    inputs = np.full((len(seqs), T - 1), EOT, dtype=np.int64)   # (B, T-1)
    targets = np.full((len(seqs), T - 1), IGNORE_INDEX, dtype=np.int64)  # (B, T-1)
    for r, s in enumerate(seqs):
        padded = np.array(list(s) + [EOT] * (T - len(s)))       # (T,)
        inputs[r] = padded[:-1]
        targets[r, :len(s)] = padded[1:len(s) + 1]               # the text's next tokens + one end-of-text
    return inputs, targets


def schedule(n_entries: int):
    """Entry indices of every step of the run: a fresh permutation per epoch, partial batch dropped."""
    rng = np.random.default_rng(SEED)
    steps = []
    for _ in range(EPOCHS):
        perm = rng.permutation(n_entries)
        steps += [perm[i:i + BATCH] for i in range(0, n_entries - BATCH + 1, BATCH)]
    return steps


# ---- one side, in its own process ------------------------------------------------------------------
def make_side(side: str, cfg: GPTConfig, numba_dtype: str = "float32"):
    if side == "book":
        import torch

        from minisft.config import init_params
        from minisft.peer import TorchGPT
        model = TorchGPT(cfg)
        model.load_numpy({n: a.astype(np.float32) for n, a in init_params(cfg, np.random.default_rng(0)).items()})
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

        def step(inputs, targets):
            model.train()
            loss = model.loss(torch.from_numpy(inputs), torch.from_numpy(targets))
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss.item(), inputs.size

        def evaluate(batches):  # the book's calc_loss_loader: the mean of the batches' mean losses
            model.eval()
            with torch.no_grad():
                return float(np.mean([model.loss(torch.from_numpy(i), torch.from_numpy(t)).item() for i, t in batches]))

        def sample(prompt):  # the book's generate_text_simple: greedy, the whole context every token
            model.eval()
            idx = torch.tensor([prompt])
            with torch.no_grad():
                for _ in range(SAMPLE_TOKENS):
                    logits = model(idx[:, -cfg.context_length:])[:, -1, :]
                    idx = torch.cat([idx, logits.argmax(dim=-1, keepdim=True)], dim=1)
            return idx[0, len(prompt):].tolist()
        return step, evaluate, sample

    model = GPT(cfg, backend="numba", dtype=numba_dtype, seed=0)
    opt = AdamW(model, lr=LR, weight_decay=WEIGHT_DECAY)

    def step(inputs, targets):
        batch = pack_padded(inputs, targets)  # drops each row's trailing padding
        model.zero_grad()
        loss_sum, n_valid = model.forward_backward(batch)
        opt.step()
        return loss_sum / n_valid, batch.num_tokens

    def evaluate(batches):
        losses = [model.loss(pack_padded(i, t)) for i, t in batches]
        return float(np.mean([loss_sum / n for loss_sum, n in losses]))

    def sample(prompt):
        return generate(model, [prompt], SAMPLE_TOKENS, eos_id=None)[0]
    return step, evaluate, sample


def worker(side: str, step_ids: list, model: str, numba_dtype: str) -> dict:
    t0 = time.perf_counter()
    train, val, prompt = token_ids()
    steps = schedule(len(train))
    per_epoch = len(steps) // EPOCHS
    step, evaluate, sample = make_side(side, GPTConfig.preset(model), numba_dtype)
    eval_batches = ([collate([train[i] for i in b]) for b in steps[:EVAL_ITER]] +
                    [collate(val[i:i + BATCH]) for i in range(0, EVAL_ITER * BATCH, BATCH)])
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    step(*collate([train[i] for i in steps[step_ids[0]]]))  # untimed warm-up
    warm = time.perf_counter() - t0
    times, tokens, evals, samples = [], [], [], []
    for s in step_ids:
        inputs, targets = collate([train[i] for i in steps[s]])
        t0 = time.perf_counter()
        _, n = step(inputs, targets)
        times.append(time.perf_counter() - t0)
        tokens.append(n)
        if s % EVAL_FREQ == 0:  # the book's global_step (from 0) % eval_freq == 0
            t0 = time.perf_counter()
            evaluate(eval_batches[:EVAL_ITER])
            evaluate(eval_batches[EVAL_ITER:])
            evals.append(time.perf_counter() - t0)
        if (s + 1) % per_epoch == 0:
            t0 = time.perf_counter()
            sample(prompt)
            samples.append(time.perf_counter() - t0)
    return dict(side=side, build_s=build, warmup_s=warm, times=times, tokens=tokens, evals=evals, samples=samples)


def run_worker(side, ids, model, numba_dtype) -> dict:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", side, "--model", model,
                          "--numba-dtype", numba_dtype,
                          "--ids", ",".join(map(str, ids))], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{side} worker failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--sample", default="24", help="steps timed per side, evenly spaced over the run, or 'all'")
    ap.add_argument("--chunks", type=int, default=4, help="alternations between the two sides")
    ap.add_argument("--numba-dtype", default="float32", choices=["float32", "bfloat16"], help="minisft's dtype")
    ap.add_argument("--worker", choices=["book", "numba"], help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, [int(i) for i in args.ids.split(",")], args.model, args.numba_dtype)))
        return

    train, _, _ = token_ids()
    steps = schedule(len(train))
    n_steps, per_epoch = len(steps), len(steps) // EPOCHS
    n_evals = len(range(0, n_steps, EVAL_FREQ))
    ids = list(range(n_steps)) if args.sample == "all" else sorted(
        set(np.linspace(0, n_steps - 1, int(args.sample)).round().astype(int).tolist())
        | {per_epoch * e - 1 for e in range(1, EPOCHS + 1)})  # each epoch's last step: its sample is timed
    padded = sum(collate([train[i] for i in s])[0].size for s in steps)
    packed = sum(sum(len(train[i]) for i in s) for s in steps)
    print(f"{len(train)} entries, {n_steps} steps ({EPOCHS} epochs of {per_epoch}), batch {BATCH}: "
          f"{padded:,} padded positions, {packed:,} after packing ({packed / padded:.0%}); "
          f"timing {len(ids)} steps per side", file=sys.stderr)

    res = {"book": [], "numba": []}
    for c in range(args.chunks):
        part = ids[c::args.chunks]
        if not part:
            continue
        for side in (("numba", "book") if c % 2 == 0 else ("book", "numba")):
            r = run_worker(side, part, args.model, args.numba_dtype)
            res[side].append(r)
            print(f"chunk {c + 1}/{args.chunks} {side}: {np.mean(r['times']):.2f} s/step over {len(part)} steps",
                  file=sys.stderr, flush=True)

    print(f"### Whole run: {EPOCHS} epochs of the book recipe, {args.model} shapes, batch {BATCH}, "
          f"{n_steps} steps, {n_evals} evaluations, {EPOCHS} samples\n")
    how = "every step, evaluation and sample timed" if len(ids) == n_steps else \
        (f"{len(ids)} steps timed per side (evenly spaced, and each epoch's last), with the evaluations and "
         f"samples among them; totals extrapolated as mean time x {n_steps} steps, {n_evals} evaluations, "
         f"{EPOCHS} samples")
    print(f"{how}; load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.\n")
    print("| pipeline | positions/step | s/step | training steps | evaluations | samples | fixed (build + first step) "
          "| whole run |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    total, train_total = {}, {}
    sides = (("book", "book-style PyTorch, padded"), ("numba", f"minisft numba {args.numba_dtype}, padding-free"))
    for side, label in sides:
        pick = lambda key, side=side: [t for r in res[side] for t in r[key]]  # noqa: E731
        times, toks, evals, samples = pick("times"), pick("tokens"), pick("evals"), pick("samples")
        fixed = float(np.median([r["build_s"] + r["warmup_s"] for r in res[side]]))
        train_total[side] = np.mean(times) * n_steps
        ev, sa = np.mean(evals) * n_evals, np.mean(samples) * EPOCHS
        total[side] = train_total[side] + ev + sa + fixed
        print(f"| {label} | {np.mean(toks):.0f} | {np.mean(times):.2f} | {train_total[side] / 60:.1f} min | "
              f"{ev / 60:.1f} min | {sa:.1f} s | {fixed:.0f} s | {total[side] / 60:.1f} min |")
    print(f"\nminisft numba is {total['book'] / total['numba']:.2f}x faster over the whole run "
          f"({train_total['book'] / train_total['numba']:.2f}x on the training steps alone).")


if __name__ == "__main__":
    main()
