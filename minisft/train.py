"""`minisft finetune`: the book's chapter-7 training loop on the padding-free engine, and beyond it:
learning-rate schedules, gradient clipping, gradient accumulation, checkpoints and exact resume.

The book's loop, step by step: for each training batch, one AdamW step on the batch's mean loss;
every eval_freq steps (the first right after step 1) the mean loss of eval_iter batches of train
and of val, printed as `Ep 1 (Step 000005): Train loss 1.174, Val loss 1.103` with the book's
0-based step; after each epoch a greedy sample for val[0]. Differences from the book, all deliberate:
batches are packed (no padding positions computed; the same loss and gradients), the shuffle order
is numpy's, not torch's (see minisft.data.Loader), the train-loss estimate uses the first eval_iter
training batches in file order (the book draws a fresh shuffle), and tokens_seen counts real tokens
rather than padded positions.

Gradient accumulation: one optimizer step covers grad_accum micro-batches; every micro-batch's
gradient is scaled by 1/(valid targets in the whole window), so the step equals one big batch
(not a mean of micro-batch means). A window never crosses an epoch boundary.

Run directory (--out): settings.json, metrics.jsonl, checkpoints/step-XXXXXX.h5 (the last
keep_last), and at the end hf/ (Hugging Face export), instruction-data-with-response.json (test
split, the book's format), loss-plot.png and summary.json.
"""
import json
import math
import os
import time
from functools import partial
from itertools import islice
from pathlib import Path

from tqdm import tqdm

from . import distributed, tokenizer
from .checkpoint import load_checkpoint, save_checkpoint
from .config import GPTConfig
from .data import Loader, collate_examples, encode_records, load_splits
from .errors import MinisftError
from .files import write_json, write_text
from .generate import generate, generate_responses
from .model import GPT
from .optim import AdamW, clip_grad_norm
from .plot import plot_losses
from .prompts import get_style
from .schedule import lr_at
from .settings import Settings

SAMPLE_TOKENS = 35  # the book's generate_and_print_sample length in chapter 7


# ---- setup -------------------------------------------------------------------------------------------
def build_model(s: Settings) -> GPT:
    cfg = GPTConfig.preset(s.model, drop_rate=s.drop_rate)
    if s.init == "random":
        return GPT(cfg, backend=s.backend, dtype=s.dtype, seed=s.seed, device=s.device)
    return GPT.from_pretrained(s.weights or s.model, backend=s.backend, dtype=s.dtype, cache_dir=s.cache_dir,
                               device=s.device, model=cfg, seed=s.seed)


def mean_batch_loss(model: GPT, loader: Loader, num_batches: int, dist=None) -> float:
    """The book's calc_loss_loader: the mean of per-batch mean losses over the first num_batches
    (of a fresh, unshuffled loader). dist: a minisft.distributed run whose ranks hold slices of
    each batch (their sums are reduced before the means)."""
    pairs = [model.loss(b) if b.num_tokens else (0.0, 0) for b in islice(loader, num_batches)]
    losses = [loss_sum / n_valid for loss_sum, n_valid in (dist.eval_sums(pairs) if dist else pairs) if n_valid]
    return sum(losses) / len(losses) if losses else float("nan")


def windows(batches, k: int):
    """Consecutive groups of k batches (the last may be shorter): one optimizer step each."""
    while window := list(islice(batches, k)):
        yield window


def checkpoints(out: Path) -> list:
    return sorted((out / "checkpoints").glob("step-*.h5"))


# ---- the loop ------------------------------------------------------------------------------------------
def finetune(s: Settings, log=print) -> dict:
    """Run (or resume) a fine-tuning job; returns the summary dict. Under torchrun each process is
    one rank of a data-parallel run (minisft.distributed): rank 0 alone logs and writes."""
    out = Path(s.out)
    dist = distributed.start(s)
    if not dist.main:
        log = lambda *_: None  # noqa: E731 (rank 0 alone reports)

    def check():
        if not s.resume and (out / "metrics.jsonl").exists():
            raise MinisftError(f"setting out: {out} already holds a run; pass --resume to continue it, "
                               "or choose another --out")
        if s.resume and not checkpoints(out):
            raise MinisftError(f"setting resume: {out} has no checkpoint to resume from")
    dist.agree(check)
    if dist.world_size > 1:
        log(f"distributed: {dist.describe()}; each rank trains on {s.batch_size // dist.world_size} of every "
            f"batch's {s.batch_size} sequences")
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "settings.json", {**s.to_dict(), **dist.record()}, indent=2)
    log("settings:")
    for k, v in s.to_dict().items():
        log(f"  {k} = {v!r}")

    raw_split, split = load_splits(s.data, s.cache_dir)
    log(f"data: {len(split.train)} train, {len(split.val)} val, {len(split.test)} test records")
    model = build_model(s)
    max_len = min(s.max_length, model.cfg.context_length)
    style = get_style(s.prompt_style)
    collate = dist.shard(partial(collate_examples, packed=True, allowed_max_length=max_len))
    train_ex = encode_records(split.train, style, s.mask_prompt)
    val_ex = encode_records(split.val, style, s.mask_prompt)
    loader = Loader(train_ex, s.batch_size, shuffle=s.shuffle, drop_last=True, seed=s.seed, collate=collate)
    eval_loader = partial(Loader, batch_size=s.batch_size, shuffle=False, drop_last=False, collate=collate)
    if len(loader) == 0:
        raise MinisftError(f"setting batch_size: {s.batch_size} is more than the {len(train_ex)} training records")
    opt = AdamW(model, lr=s.lr, weight_decay=s.weight_decay, decay=s.decay)
    steps_per_epoch = math.ceil(len(loader) / s.grad_accum)
    total_steps = s.epochs * steps_per_epoch if s.max_steps is None else min(s.max_steps, s.epochs * steps_per_epoch)
    log(f"model: {s.model} ({model.num_params():,} parameters, {s.init} init), backend {s.backend} {s.dtype}; "
        f"{steps_per_epoch} steps per epoch, {total_steps} steps")

    step, tokens_seen, records, train_time = 0, 0, [], 0.0
    if s.resume and dist.main:
        path = checkpoints(out)[-1]
        _, _, state = load_checkpoint(path, model=model, optimizer=opt)
        step, tokens_seen, records = state["step"], state["tokens_seen"], state["records"]
        train_time = state["train_time"]
        loader.load_state_dict(state["loader"])
        log(f"resuming from {path} at step {step}")
    step, tokens_seen, train_time = dist.sync_start(model, opt, loader, (step, tokens_seen, train_time))
    # metrics.jsonl holds exactly the records up to the current step (a resumed run drops any
    # records written after its checkpoint, so every step appears once).
    if dist.main:
        write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    metrics = open(out / "metrics.jsonl" if dist.main else os.devnull, "a", encoding="utf-8")

    def save(step):
        if not dist.main:
            return
        save_checkpoint(out / "checkpoints" / f"step-{step:06d}.h5", model, opt,
                        dict(step=step, tokens_seen=tokens_seen, records=records, loader=loader.state_dict(),
                             train_time=train_time, settings=s.to_dict()))
        for old in checkpoints(out)[:-s.keep_last]:
            old.unlink()

    def emit(record):
        records.append(record)
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()

    bar = tqdm(total=total_steps, initial=step, desc="finetune", unit="step", disable=None if dist.main else True)
    try:
        while step < total_steps:
            epoch = loader.epoch
            for window in windows(iter(loader), s.grad_accum):  # the rest of this epoch
                t0 = time.perf_counter()
                n_valid, n_tokens = dist.count(window)  # over every rank's slice of the window
                model.zero_grad()
                loss = sum(model.forward_backward(b, grad_scale=1.0 / n_valid)[0] for b in window if b.num_valid)
                loss = dist.reduce_gradients(model, loss) / n_valid
                grad_norm = clip_grad_norm(model, s.grad_clip)
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    last = checkpoints(out)
                    raise MinisftError(f"the training loss became {loss} (gradient norm {grad_norm}) at step "
                                       f"{step + 1}; stopping without updating the weights. The last good "
                                       f"checkpoint is {last[-1] if last else 'none (no step was saved yet)'}")
                lr = lr_at(step + 1, s.lr, s.schedule, s.warmup_steps, total_steps, s.min_lr)
                opt.step(lr=lr)
                step += 1
                train_time += time.perf_counter() - t0
                tokens_seen += n_tokens
                emit(dict(kind="step", step=step, epoch=epoch + 1, loss=loss, lr=lr, tokens_seen=tokens_seen,
                          grad_norm=grad_norm))
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_seen / max(train_time, 1e-9):,.0f}")
                bar.update(1)
                if (step - 1) % s.eval_freq == 0:  # the book's global_step % eval_freq == 0
                    train_loss = mean_batch_loss(model, eval_loader(train_ex), s.eval_iter, dist)
                    val_loss = mean_batch_loss(model, eval_loader(val_ex), s.eval_iter, dist)
                    emit(dict(kind="eval", step=step, epoch=epoch + 1, train_loss=train_loss, val_loss=val_loss,
                              tokens_seen=tokens_seen))
                    if dist.main:
                        bar.write(f"Ep {epoch + 1} (Step {step - 1:06d}): Train loss {train_loss:.3f}, "
                                  f"Val loss {val_loss:.3f}")
                if step % s.ckpt_every == 0 or step == total_steps:
                    save(step)
                if step == total_steps:
                    break
            if dist.main and (loader.epoch > epoch or loader.batch == len(loader)):  # the epoch is complete
                bar.write(sample_text(model, style, split.val[0]))
    except KeyboardInterrupt:
        last = checkpoints(out)
        log(f"interrupted at step {step}; the last checkpoint is {last[-1] if last else 'none'}: "
            f"continue with --resume --out {out}")
        raise
    finally:
        bar.close()
        metrics.close()
    if not checkpoints(out) or checkpoints(out)[-1].name != f"step-{step:06d}.h5":
        save(step)
    dist.close()  # no collective after the last step: the other ranks are done
    run = dict(dist.record(), tokens_per_rank=dist.valid_per_rank)
    if not dist.main:
        return dict(steps=step, tokens_seen=tokens_seen, rank=dist.rank, **run)
    return finish(s, out, model, style, raw_split, split, records, train_time, tokens_seen, step, log, run)


def sample_text(model: GPT, style, record) -> str:
    """The book's generate_and_print_sample: greedy continuation of val[0]'s prompt, one line."""
    prompt = style.format_input(record["messages"])
    ids = tokenizer.encode(prompt)
    new = generate(model, [ids], SAMPLE_TOKENS)[0]
    return tokenizer.decode(ids + new).replace("\n", " ")


def finish(s, out, model, style, raw_split, split, records, train_time, tokens_seen, step, log, run) -> dict:
    """The end of a run: HF export, test-set responses, the loss plot, the summary (with run:
    world_size and the target tokens each rank trained on)."""
    model.save_pretrained(out / "hf")
    n = len(split.test) if s.responses is None else min(s.responses, len(split.test))
    if n:
        prompts = [style.prompt(r["messages"]) for r in split.test[:n]]
        answers = generate_responses(model, prompts, tokenizer.encode, tokenizer.decode, s.max_new_tokens)
        entries = [dict(rec, model_response=a) for rec, a in zip(raw_split.test[:n], answers)]
        write_json(out / "instruction-data-with-response.json", entries)
    evals = [r for r in records if r["kind"] == "eval"]
    steps = [r for r in records if r["kind"] == "step"]
    note = plot_losses(evals, steps[-1]["epoch"] if steps else 0, out / "loss-plot.png") if evals else None
    if note:
        log(note)
    summary = dict(steps=step, train_seconds=round(train_time, 3), tokens_seen=tokens_seen,
                   tokens_per_second=round(tokens_seen / train_time, 1) if train_time else None,
                   final_train_loss=evals[-1]["train_loss"] if evals else None,
                   final_val_loss=evals[-1]["val_loss"] if evals else None,
                   last_step_loss=steps[-1]["loss"] if steps else None, responses=n, **run)
    write_json(out / "summary.json", summary, indent=2)
    log(f"done: {step} steps in {train_time:.1f} s of training ({summary['tokens_per_second']} tokens/s); "
        f"train loss {summary['final_train_loss']}, val loss {summary['final_val_loss']}; outputs in {out}")
    return summary
