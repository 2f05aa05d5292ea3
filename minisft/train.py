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
import time
from functools import partial
from itertools import islice
from pathlib import Path

from tqdm import tqdm

from . import memory, tokenizer
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


def mean_batch_loss(model: GPT, loader: Loader, num_batches: int) -> float:
    """The book's calc_loss_loader: the mean of per-batch mean losses over the first num_batches
    (of a fresh, unshuffled loader)."""
    losses = []
    for batch in islice(loader, num_batches):
        loss_sum, n_valid = model.loss(batch)
        losses.append(loss_sum / n_valid)
    return sum(losses) / len(losses) if losses else float("nan")


def windows(batches, k: int):
    """Consecutive groups of k batches (the last may be shorter): one optimizer step each."""
    while window := list(islice(batches, k)):
        yield window


def checkpoints(out: Path) -> list:
    return sorted((out / "checkpoints").glob("step-*.h5"))


# ---- the loop ------------------------------------------------------------------------------------------
def finetune(s: Settings, log=print) -> dict:
    """Run (or resume) a fine-tuning job; returns the summary dict."""
    out = Path(s.out)
    if not s.resume and (out / "metrics.jsonl").exists():
        raise MinisftError(f"setting out: {out} already holds a run; pass --resume to continue it, "
                           "or choose another --out")
    if s.resume and not checkpoints(out):
        raise MinisftError(f"setting resume: {out} has no checkpoint to resume from")
    out.mkdir(parents=True, exist_ok=True)
    log("settings:")
    for k, v in s.to_dict().items():
        log(f"  {k} = {v!r}")
    write_json(out / "settings.json", s.to_dict(), indent=2)

    raw_split, split = load_splits(s.data, s.cache_dir)
    log(f"data: {len(split.train)} train, {len(split.val)} val, {len(split.test)} test records")
    cfg = GPTConfig.preset(s.model, drop_rate=s.drop_rate)
    max_len = min(s.max_length, cfg.context_length)
    style = get_style(s.prompt_style)
    collate = partial(collate_examples, packed=True, allowed_max_length=max_len)
    train_ex = encode_records(split.train, style, s.mask_prompt)
    val_ex = encode_records(split.val, style, s.mask_prompt)
    plan = memory_plan(s, train_ex, log)  # refuses before the model takes any memory
    model = build_model(s)
    model.grad_checkpoint = s.grad_checkpoint
    loader = Loader(train_ex, s.batch_size, shuffle=s.shuffle, drop_last=True, seed=s.seed, collate=collate)
    eval_loader = partial(Loader, batch_size=s.batch_size, shuffle=False, drop_last=False, collate=collate)
    if len(loader) == 0:
        raise MinisftError(f"setting batch_size: {s.batch_size} is more than the {len(train_ex)} training records")
    opt = AdamW(model, lr=s.lr, weight_decay=s.weight_decay, decay=s.decay, state=s.optim_state)
    steps_per_epoch = math.ceil(len(loader) / s.grad_accum)
    total_steps = s.epochs * steps_per_epoch if s.max_steps is None else min(s.max_steps, s.epochs * steps_per_epoch)
    log(f"model: {s.model} ({model.num_params():,} parameters, {s.init} init), backend {s.backend} {s.dtype}; "
        f"{steps_per_epoch} steps per epoch, {total_steps} steps")

    step, tokens_seen, records, train_time = 0, 0, [], 0.0
    if s.resume:
        path = checkpoints(out)[-1]
        _, _, state = load_checkpoint(path, model=model, optimizer=opt)
        step, tokens_seen, records = state["step"], state["tokens_seen"], state["records"]
        train_time = state["train_time"]
        loader.load_state_dict(state["loader"])
        log(f"resuming from {path} at step {step}")
    # metrics.jsonl holds exactly the records up to the current step (a resumed run drops any
    # records written after its checkpoint, so every step appears once).
    write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    metrics = open(out / "metrics.jsonl", "a", encoding="utf-8")

    def save(step):
        save_checkpoint(out / "checkpoints" / f"step-{step:06d}.h5", model, opt,
                        dict(step=step, tokens_seen=tokens_seen, records=records, loader=loader.state_dict(),
                             train_time=train_time, settings=s.to_dict()))
        for old in checkpoints(out)[:-s.keep_last]:
            old.unlink()

    def emit(record):
        records.append(record)
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()

    bar = tqdm(total=total_steps, initial=step, desc="finetune", unit="step", disable=None)
    try:
        while step < total_steps:
            epoch = loader.epoch
            for window in windows(iter(loader), s.grad_accum):  # the rest of this epoch
                t0 = time.perf_counter()
                lr = lr_at(step + 1, s.lr, s.schedule, s.warmup_steps, total_steps, s.min_lr)
                if s.fused_update:  # each tensor updated in the backward (a bad loss is seen after it)
                    loss, grad_norm = opt.fused_step(window[0], lr=lr)
                else:
                    n_valid = sum(b.num_valid for b in window)
                    model.zero_grad()
                    loss = sum(model.forward_backward(b, grad_scale=1.0 / n_valid)[0] for b in window) / n_valid
                    grad_norm = clip_grad_norm(model, s.grad_clip)
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    last = checkpoints(out)
                    raise MinisftError(f"the training loss became {loss} (gradient norm {grad_norm}) at step "
                                       f"{step + 1}; stopping without updating the weights. The last good "
                                       f"checkpoint is {last[-1] if last else 'none (no step was saved yet)'}")
                if not s.fused_update:
                    opt.step(lr=lr)
                step += 1
                train_time += time.perf_counter() - t0
                tokens_seen += sum(b.num_tokens for b in window)
                emit(dict(kind="step", step=step, epoch=epoch + 1, loss=loss, lr=lr, tokens_seen=tokens_seen,
                          grad_norm=grad_norm, **measured_memory(model)))
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_seen / max(train_time, 1e-9):,.0f}")
                bar.update(1)
                if (step - 1) % s.eval_freq == 0:  # the book's global_step % eval_freq == 0
                    train_loss = mean_batch_loss(model, eval_loader(train_ex), s.eval_iter)
                    val_loss = mean_batch_loss(model, eval_loader(val_ex), s.eval_iter)
                    emit(dict(kind="eval", step=step, epoch=epoch + 1, train_loss=train_loss, val_loss=val_loss,
                              tokens_seen=tokens_seen))
                    bar.write(f"Ep {epoch + 1} (Step {step - 1:06d}): Train loss {train_loss:.3f}, "
                              f"Val loss {val_loss:.3f}")
                if step % s.ckpt_every == 0 or step == total_steps:
                    save(step)
                if step == total_steps:
                    break
            if loader.epoch > epoch or loader.batch == len(loader):  # the epoch is complete
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
    return finish(s, out, model, style, raw_split, split, records, train_time, tokens_seen, step, log,
                  memory_estimate_mb=round(sum(plan.values()) / 2**20, 1))


# ---- memory --------------------------------------------------------------------------------------------
def memory_plan(s: Settings, train_ex, log=print) -> dict:
    """Log the estimated memory per part for these settings (minisft.memory) and, with memory_check,
    refuse when it exceeds what is available. Needs only the tokenized data, not the model."""
    cfg = GPTConfig.preset(s.model, drop_rate=s.drop_rate)
    max_len = min(s.max_length, cfg.context_length)
    lengths = [len(e.tokens) + 1 for e in train_ex]  # + the end-of-text each row gets

    def estimate_with(**changes):
        t = {**s.to_dict(), **changes}
        tokens = memory.batch_tokens_bound(lengths, t["batch_size"], max_len)
        return memory.estimate(cfg, tokens, s.dtype, t["optim_state"], t["grad_checkpoint"], t["fused_update"])

    parts = estimate_with()
    log(f"{memory.format_plan(parts)}\n  (micro-batches of at most "
        f"{memory.batch_tokens_bound(lengths, s.batch_size, max_len)} tokens)")
    if s.memory_check:
        if s.backend == "torch" and (s.device or "").startswith("cuda"):  # the arrays live on the GPU
            where, available = s.device, memory.cuda_available_bytes(s.device)
        else:
            where, available = "this machine", memory.available_bytes()
        memory.check_fits(parts, available, where, s, estimate_with)
    return parts


def plan_run(s: Settings, log=print) -> dict:
    """`minisft finetune --dry-run`: the data tokenized, the memory plan printed (and checked); no
    model, no run directory."""
    _, split = load_splits(s.data, s.cache_dir)
    return memory_plan(s, encode_records(split.train, get_style(s.prompt_style), s.mask_prompt), log)


def measured_memory(model: GPT) -> dict:
    """The peak memory so far, in MiB: the process's resident set, and torch's on a CUDA device."""
    rec = dict(peak_rss_mb=round(memory.peak_rss_bytes() / 2**20, 1))
    cuda = memory.cuda_peak_bytes(model.B)
    if cuda is not None:
        rec["cuda_peak_mb"] = round(cuda / 2**20, 1)
    return rec


def sample_text(model: GPT, style, record) -> str:
    """The book's generate_and_print_sample: greedy continuation of val[0]'s prompt, one line."""
    prompt = style.format_input(record["messages"])
    ids = tokenizer.encode(prompt)
    new = generate(model, [ids], SAMPLE_TOKENS)[0]
    return tokenizer.decode(ids + new).replace("\n", " ")


def finish(s, out, model, style, raw_split, split, records, train_time, tokens_seen, step, log,
           memory_estimate_mb=None) -> dict:
    """The end of a run: HF export, test-set responses, the loss plot, the summary."""
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
                   last_step_loss=steps[-1]["loss"] if steps else None, responses=n,
                   memory_estimate_mb=memory_estimate_mb, **measured_memory(model))
    write_json(out / "summary.json", summary, indent=2)
    log(f"done: {step} steps in {train_time:.1f} s of training ({summary['tokens_per_second']} tokens/s); "
        f"train loss {summary['final_train_loss']}, val loss {summary['final_val_loss']}; outputs in {out}")
    return summary
