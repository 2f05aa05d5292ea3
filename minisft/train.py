"""`minisft finetune`: the book's chapter-7 training loop on the padding-free engine, and beyond it:
learning-rate schedules, gradient clipping, gradient accumulation, checkpoints and exact resume.

The book's loop, step by step: for each training batch, one AdamW step on the batch's mean loss;
every eval_freq steps (the first right after step 1) the mean loss of eval_iter batches of train
and of val, printed as `Ep 1 (Step 000006): Train loss 1.174, Val loss 1.103`; after each epoch a
greedy sample for val[0]. Steps count optimizer steps done, from 1, on the console and in
metrics.jsonl alike (the book prints the 0-based global step, one less). Differences from the
book, all deliberate:
batches are packed (no padding positions computed; the same loss and gradients), the shuffle order
is numpy's, not torch's (see minisft.data.Loader), the train-loss estimate uses the first eval_iter
training batches in file order (the book draws a fresh shuffle), and tokens_seen counts real tokens
rather than padded positions.

Gradient accumulation: one optimizer step covers grad_accum micro-batches; every micro-batch's
gradient is scaled by 1/(valid targets in the whole window), so the step equals one big batch
(not a mean of micro-batch means). A window never crosses an epoch boundary.

Early stopping (--early-stop P): after each evaluation, a val loss below the best so far is saved
as checkpoints/best.h5; P evaluations in a row without one end the run. --export best makes the
end-of-run export and responses use best.h5's weights.

Run directory (--out): settings.json, metrics.jsonl, checkpoints/step-XXXXXX.h5 (the last
keep_last; best.h5 with early stopping), and at the end hf/ (Hugging Face export; a LoRA run:
adapter/, PEFT's layout), instruction-data-with-response.json (test split, the book's format),
loss-plot.png and summary.json.
"""
import contextlib
import dataclasses
import json
import math
import os
import time
from functools import partial
from itertools import islice
from pathlib import Path

from . import backends, distributed, lora, memory, tokenizer
from .checkpoint import load_checkpoint, save_checkpoint
from .config import GPTConfig
from .data import Loader, collate_examples, encode_records, long_records, load_splits
from .errors import MinisftError
from .files import write_json, write_text
from .generate import generate, generate_responses
from .model import GPT
from .optim import AdamW, clip_grad_norm, lr_at
from .plot import plot_losses
from .pretrained import read_pretrained
from .progress import progress
from .prompts import get_style
from .rundir import RunLock, checkpoints, plan_run, removed_if_refused, start
from .settings import Settings, architecture

SAMPLE_TOKENS = 35  # the book's generate_and_print_sample length in chapter 7
ESTIMATE_AFTER = 3  # steady steps timed before the run's length is estimated from them


# ---- setup -------------------------------------------------------------------------------------------
def model_source(s: Settings) -> tuple[GPTConfig, dict | None]:
    """The model's shape and its starting weights (None: a random init). Without --model, a
    --weights folder's config.json gives the architecture."""
    cfg = architecture(s)
    if s.init == "random":
        return cfg, None
    return read_pretrained(s.weights or s.model, cache_dir=s.cache_dir, model=cfg)


def mean_batch_loss(model: GPT, loader: Loader, num_batches: int, dist=None) -> float:
    """The book's calc_loss_loader: the mean of per-batch mean losses over the first num_batches
    (of a fresh, unshuffled loader). dist: a minisft.distributed run whose ranks hold slices of
    each batch (their sums are reduced before the means); a batch with no trained target has no mean."""
    pairs = [model.loss(b) if b.num_valid else (0.0, 0) for b in islice(loader, num_batches)]
    losses = [loss_sum / n_valid for loss_sum, n_valid in (dist.eval_sums(pairs) if dist else pairs) if n_valid]
    return sum(losses) / len(losses) if losses else float("nan")


def windows(batches, k: int):
    """Consecutive groups of k batches (the last may be shorter): one optimizer step each."""
    while window := list(islice(batches, k)):
        yield window


def best_checkpoint(out: Path) -> Path:
    return out / "checkpoints" / "best.h5"


@dataclasses.dataclass
class StepTimes:
    """Seconds in optimizer steps, with each start's first step apart: it compiles numba's kernels
    (or loads them from numba's cache) and warms every cache, so it says nothing of the speed of
    the steps after it. A resumed run has one first step per start."""
    first_s: float = 0.0
    starts: int = 0
    steady_s: float = 0.0
    steady_tokens: int = 0

    @classmethod
    def from_state(cls, state: dict) -> "StepTimes":
        if "step_times" in state:
            return cls(**state["step_times"])
        return cls(steady_s=state["train_time"], steady_tokens=state["tokens_seen"])  # an older checkpoint's

    @property
    def total_s(self) -> float:
        return self.first_s + self.steady_s

    def tokens_per_s(self) -> float | None:
        return self.steady_tokens / self.steady_s if self.steady_s else None

    def describe(self) -> str:
        """`36.1 s of training: first step (compiling/warm-up) 24.0 s, then 480 tokens/s`"""
        if not self.starts:
            return f"{self.total_s:.1f} s of training"
        first = "first step" if self.starts == 1 else f"first step of each of {self.starts} starts"
        rate = f", then {self.tokens_per_s():,.0f} tokens/s" if self.steady_s else ""
        return f"{self.total_s:.1f} s of training: {first} (compiling/warm-up) {self.first_s:.1f} s{rate}"


def evaluations_in(first: int, last: int, eval_freq: int) -> tuple:
    """(evaluations a start running steps first+1 .. last makes, how many of them come before its last
    step): the book's after steps 1, 1 + eval_freq, ..., and one of the last step's weights."""
    before_last = sum(1 for k in range(first + 1, last) if (k - 1) % eval_freq == 0)
    return before_last + (last > first), before_last


def estimate_line(steps: int, step_times: list, evals: int, eval_times: list) -> str:
    """This start's length from what it measured: its first step as timed (it compiles and warms
    up), the other steps at the steady steps' mean, its evaluations at theirs (the first left out
    too where there are more)."""
    first, per_step = step_times[0], sum(step_times[1:]) / (len(step_times) - 1)
    timed = eval_times[1:] or eval_times
    per_eval = sum(timed) / len(timed) if timed else 0.0
    total = (first + (steps - 1) * per_step + evals * per_eval) / 60
    return (f"estimated: first step {first:.1f} s + {steps - 1} steps x {per_step:.3f} s + {evals} evaluations x "
            f"{per_eval:.3f} s = {total:.1f} min (the end's export and test responses not counted)")


# ---- the loop ------------------------------------------------------------------------------------------
def resolved_dtype(s: Settings) -> str:
    """The dtype these settings run in ("auto" decided for their backend on this machine)."""
    return backends.resolve_dtype(s.dtype, backends.resolve(s.backend, s.device)[0])


def check_dtype(s: Settings, log=print) -> None:
    """Refuse a dtype that its backend cannot run here, before any work; warn about one that it would
    run emulated."""
    name, device = backends.resolve(s.backend, s.device)
    dtype = backends.resolve_dtype(s.dtype, name)
    problem = backends.dtype_problem(dtype, name)
    if problem:
        raise MinisftError(f"setting dtype: {dtype} on the {name} backend cannot run here: {problem}")
    warning = backends.dtype_warning(dtype, name, device)
    if warning:
        log(f"warning: {warning}")


def finetune(s: Settings, log=print) -> dict:
    """Run (or resume) a fine-tuning job, owning its folder (minisft.rundir); returns the summary dict.
    Under torchrun each process is one rank of a data-parallel run (minisft.distributed): rank 0
    alone holds the folder's lock, logs and writes; its checks are every rank's."""
    # The run records the dtype "auto" stands for here, so that a resume elsewhere cannot change it.
    s = dataclasses.replace(s, dtype=resolved_dtype(s))
    out = Path(s.out)
    if out.exists() and not out.is_dir():
        raise MinisftError(f"setting out: {out} is a file, not a folder")
    if s.export == "best" and s.early_stop is None:
        raise MinisftError("setting export: best needs --early-stop (which keeps the best checkpoint)")
    dist = distributed.start(s)
    if not dist.main:
        log = lambda *_: None  # noqa: E731 (rank 0 alone reports)
    check_dtype(s, log)
    if dist.world_size > 1:
        log(f"distributed: {dist.describe()}; each rank trains on {s.batch_size // dist.world_size} of every "
            f"batch's {s.batch_size} sequences")
    held, plan = contextlib.ExitStack(), [None]

    def check():  # rank 0: own the folder and plan the run (fresh, resume, refusal)
        out.mkdir(parents=True, exist_ok=True)
        held.enter_context(RunLock(out, log))
        plan[0] = plan_run(s, log)
    with removed_if_refused(out), held:
        dist.agree(check)
        return _finetune(s, out, plan[0], log, dist)


def _finetune(s: Settings, out: Path, plan, log, dist) -> dict:
    cfg, weights = model_source(s)
    max_len = min(s.max_length, cfg.context_length)
    log("settings:")
    for k, v in s.to_dict().items():
        clamped = f"  (effective {max_len}: the model's context)" if k == "max_length" and max_len < v else ""
        log(f"  {k} = {v!r}{clamped}")

    raw_split, split = load_splits(s.data, s.cache_dir)
    log(f"data: {len(split.train)} train, {len(split.val)} val, {len(split.test)} test records")
    style = get_style(s.prompt_style)
    collate = dist.shard(partial(collate_examples, packed=True, allowed_max_length=max_len))
    train_ex = encode_records(split.train, style, s.mask_prompt)
    val_ex = encode_records(split.val, style, s.mask_prompt)
    train_ex, val_ex = (report_long(name, ex, recs, style, max_len, s, log)
                        for name, ex, recs in (("train", train_ex, split.train), ("val", val_ex, split.val)))
    mem_plan = memory_plan(s, cfg, train_ex, log)  # refuses before the model takes its memory
    try:
        model = GPT(cfg, backend=s.backend, dtype=s.dtype, seed=s.seed, device=s.device, params=weights)
    except ImportError as e:  # a backend whose library is not installed here
        raise MinisftError(f"setting backend: {s.backend} cannot run here ({e})") from None
    del weights  # the model holds its own copy
    model.grad_checkpoint = s.grad_checkpoint
    if s.lora_rank is not None:
        # An absolute path: generate, chat, eval and export find the base from any folder.
        base = str(Path(s.weights).resolve()) if s.weights else s.model
        lora.attach(model, lora.lora_config(s), seed=s.seed, base_path=base)
    loader = Loader(train_ex, s.batch_size, shuffle=s.shuffle, drop_last=True, seed=s.seed, collate=collate)
    eval_loader = partial(Loader, batch_size=s.batch_size, shuffle=False, drop_last=False, collate=collate)
    if len(loader) == 0:
        raise MinisftError(f"setting batch_size: {s.batch_size} is more than the {len(train_ex)} training records")
    opt = AdamW(model, lr=s.lr, weight_decay=s.weight_decay, decay=s.decay, state=s.optim_state)
    steps_per_epoch = math.ceil(len(loader) / s.grad_accum)
    total_steps = s.epochs * steps_per_epoch if s.max_steps is None else min(s.max_steps, s.epochs * steps_per_epoch)
    log(f"model: {s.model or s.weights} ({cfg.n_layers} layers, d={cfg.emb_dim}, context {cfg.context_length}; "
        f"{model.num_params():,} parameters, {s.init} init), backend {model.B.name} {model.dtype}; "
        f"{steps_per_epoch} steps per epoch, {total_steps} steps")
    log(lora.trainable_parameters(model))

    step, tokens_seen, records, times, empty_batches = 0, 0, [], StepTimes(), 0
    best = dict(val_loss=math.inf, step=None, since=0)  # early stopping: the best eval and evals since
    if s.resume and dist.main:
        path, state = resume_from(plan.checkpoints, model, opt, log)
        step, tokens_seen, records = state["step"], state["tokens_seen"], state["records"]
        times, empty_batches = StepTimes.from_state(state), state.get("empty_batches", 0)
        best = state.get("best", best)
        loader.load_state_dict(state["loader"])
        log(f"resuming from {path} at step {step}")
    if dist.main:
        start(s, plan, log, dist.record())  # every check passed: the folder is written from here on
    last_eval = max((r["step"] for r in records if r["kind"] == "eval"), default=0)
    # rank 0's resumed position (and early-stopping record) on every rank, so every rank decides alike
    step, tokens_seen, times, best, last_eval = dist.sync_start(model, opt, loader,
                                                                (step, tokens_seen, times, best, last_eval))
    first_step, here = step, []  # the step this start begins at; the seconds of each step it times
    eval_times, estimated = [], False
    evals_planned, evals_before_last = evaluations_in(first_step, total_steps, s.eval_freq)
    # metrics.jsonl holds exactly the records up to the current step (a resumed run drops any
    # records written after its checkpoint, so every step appears once).
    if dist.main:
        write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    metrics = open(out / "metrics.jsonl" if dist.main else os.devnull, "a", encoding="utf-8")

    def save(step, path=None):
        if not dist.main:
            return
        (lora.save_checkpoint if model.lora is not None else save_checkpoint)(
            path or out / "checkpoints" / f"step-{step:06d}.h5", model, opt,
            dict(step=step, tokens_seen=tokens_seen, records=records, loader=loader.state_dict(),
                 step_times=dataclasses.asdict(times), best=best, settings=s.to_dict(),
                 empty_batches=empty_batches))
        for old in checkpoints(out)[:-s.keep_last]:
            old.unlink()

    def emit(record):
        records.append(record)
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()

    def evaluate(epoch) -> None:
        """The book's evaluation; with early stopping, a val loss below the best so far saved as best.h5."""
        nonlocal best, last_eval
        t0 = time.perf_counter()
        train_loss = mean_batch_loss(model, eval_loader(train_ex), s.eval_iter, dist)
        val_loss = mean_batch_loss(model, eval_loader(val_ex), s.eval_iter, dist)
        eval_times.append(time.perf_counter() - t0)
        emit(dict(kind="eval", step=step, epoch=epoch, train_loss=train_loss, val_loss=val_loss,
                  tokens_seen=tokens_seen))
        last_eval = step
        if dist.main:
            bar.write(f"Ep {epoch} (Step {step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        if s.early_stop is not None:  # the reduced val loss: every rank decides alike
            improved = val_loss < best["val_loss"]
            best = dict(val_loss=val_loss, step=step, since=0) if improved else {**best, "since": best["since"] + 1}
            if improved:
                save(step, best_checkpoint(out))

    stopped = s.early_stop is not None and best["since"] >= s.early_stop  # resumed after it stopped
    if model.B.name == "numba" and step < total_steps and not stopped:
        log("numba: the first step compiles the kernels, or loads them from numba's cache after the first run ...")
    bar = progress(total_steps, "finetune", "step", initial=step, enabled=dist.main)
    try:
        while step < total_steps and not stopped:
            epoch = loader.epoch
            for window in windows(iter(loader), s.grad_accum):  # the rest of this epoch
                t0 = time.perf_counter()
                n_valid, n_tokens = dist.count(window)  # over every rank's slice of the window
                if not n_valid:  # no trained target in the whole window: the step happens (schedule and
                    # checkpoints keep their places) without an update, and so without an evaluation
                    empty_batches += len(window)
                    step += 1
                    emit(dict(kind="skip", step=step, epoch=epoch + 1, reason="no trained target in the batch"))
                    bar.update(1)
                    if step % s.ckpt_every == 0 or step == total_steps:
                        save(step)
                    if step == total_steps:
                        break
                    continue
                empty_batches += sum(not b.num_valid for b in window)  # a batch with none adds nothing
                lr = lr_at(step + 1, s.lr, s.schedule, s.warmup_steps, total_steps, s.min_lr)
                if s.fused_update:  # each tensor updated in the backward (a bad loss is seen after it)
                    loss, grad_norm = opt.fused_step(window[0], lr=lr)
                else:
                    model.zero_grad()
                    loss = sum(model.forward_backward(b, grad_scale=1.0 / n_valid)[0] for b in window if b.num_valid)
                    loss = dist.reduce_gradients(model, loss) / n_valid
                    grad_norm = clip_grad_norm(model, s.grad_clip)
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    last = checkpoints(out)
                    raise MinisftError(f"the training loss became {loss} (gradient norm {grad_norm}) at step "
                                       f"{step + 1}; stopping without updating the weights. The last good "
                                       f"checkpoint is {last[-1] if last else 'none (no step was saved yet)'}")
                if not s.fused_update:
                    opt.step(lr=lr)
                step += 1
                here.append(time.perf_counter() - t0)
                if len(here) == 1:
                    times.first_s, times.starts = times.first_s + here[0], times.starts + 1
                else:
                    times.steady_s, times.steady_tokens = times.steady_s + here[-1], times.steady_tokens + n_tokens
                tokens_seen += n_tokens
                emit(dict(kind="step", step=step, epoch=epoch + 1, loss=loss, lr=lr, tokens_seen=tokens_seen,
                          grad_norm=grad_norm, **measured_memory(model)))
                rate = {"tok_s": f"{times.tokens_per_s():,.0f}"} if times.steady_s else {}  # steady steps only
                bar.set_postfix(loss=f"{loss:.3f}", **rate)
                bar.update(1)
                if (step - 1) % s.eval_freq == 0:  # the book's global_step % eval_freq == 0
                    evaluate(epoch + 1)
                    stopped = s.early_stop is not None and best["since"] >= s.early_stop
                    if stopped and dist.main:
                        bar.write(f"early stop: the val loss has not improved for {s.early_stop} evaluations; "
                                  f"the best, {best['val_loss']:.3f} at step {best['step']}, is in "
                                  f"{best_checkpoint(out)}")
                # Once ESTIMATE_AFTER steady steps and, where there are two, an evaluation besides the first are timed.
                if not estimated and len(here) > ESTIMATE_AFTER and len(eval_times) >= min(2, evals_before_last):
                    estimated = True
                    if dist.main:
                        bar.write(estimate_line(total_steps - first_step, here, evals_planned, eval_times))
                if step % s.ckpt_every == 0 or step == total_steps or stopped:
                    save(step)
                if step == total_steps or stopped:
                    break
            if dist.main and (loader.epoch > epoch or loader.batch == len(loader)):  # the epoch is complete
                bar.write(sample_text(model, style, split.val[0]))
        # The reported losses are the last weights': evaluate them unless the last step just did.
        # The last step's checkpoint is already written: a longer run resumed from it has no such evaluation.
        if last_eval != step:
            evaluate((step - 1) // steps_per_epoch + 1)
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
    if s.export == "best":
        load_run_checkpoint(best_checkpoint(out), model)
        log(f"export: the best checkpoint (val loss {best['val_loss']:.3f} at step {best['step']})")
    if empty_batches:
        log(f"{empty_batches} batches had no trained target (every target masked or cut off) and contributed nothing")
    return finish(s, out, model, style, raw_split, split, records, times, tokens_seen, step, log,
                  dict(run, empty_batches=empty_batches,
                       memory_estimate_mb=round(sum(mem_plan.values()) / 2**20, 1)))

def report_long(name, examples, records, style, max_len, s, log) -> list:
    """Say how many records max_len cuts and how many lose their whole response; drop them with
    --drop-long. Refuse a training split in which no record keeps a trained target."""
    cut, lost = long_records(examples, records, style, max_len)
    if cut:
        first = ", ".join(map(str, lost[:5] or cut[:5]))
        log(f"{name}: {len(cut)} of {len(examples)} records are longer than max-length {max_len} tokens and are "
            f"{'dropped' if s.drop_long else 'cut'}; {len(lost)} of them lose their whole response "
            f"({name} records {first}{' ...' if len(lost or cut) > 5 else ''})"
            + ("" if s.drop_long else "; --drop-long drops them"))
    if s.drop_long:
        examples = [e for i, e in enumerate(examples) if i not in set(cut)]
    trainable = [e for e in examples if len(e.tokens) <= max_len or e.trained[1:max_len + 1].any()]
    if name == "train" and not trainable:
        raise MinisftError(f"setting max_length: at {max_len} tokens no training record keeps a trained target "
                           f"(mask-prompt {s.mask_prompt} masks everything before the cut); raise --max-length")
    return examples


def load_run_checkpoint(path, model, opt=None) -> dict:
    """A run's checkpoint into model (and opt) -> its train_state; a LoRA run's holds adapters only."""
    if model.lora is not None:
        return lora.load_checkpoint(path, model, opt)
    return load_checkpoint(path, model=model, optimizer=opt)[2]


def resume_from(candidates, model, opt, log):
    """Load the newest checkpoint that loads whole -> (path, train_state); name the ones skipped."""
    failed = []
    for path in candidates:
        try:
            return path, load_run_checkpoint(path, model, opt)
        except MinisftError as e:
            log(f"skipping the checkpoint {path.name}: {e}")
            failed.append(path.name)
    raise MinisftError(f"setting resume: none of the checkpoints {', '.join(failed)} loads; start afresh with "
                       "--overwrite")


# ---- memory --------------------------------------------------------------------------------------------
def memory_plan(s: Settings, cfg: GPTConfig, train_ex, log=print) -> dict:
    """Log the estimated memory per part for these settings (minisft.memory) and whether it fits, and
    with memory_check refuse when it does not. Needs only the tokenized data, not the model."""
    max_len = min(s.max_length, cfg.context_length)
    lengths = [len(e.tokens) + 1 for e in train_ex]  # + the end-of-text each row gets
    adapters = lora.lora_config(s) if s.lora_rank is not None else None

    def estimate_with(**changes):
        t = {**s.to_dict(), **changes}
        tokens = memory.batch_tokens_bound(lengths, t["batch_size"], max_len)
        return memory.estimate(cfg, tokens, resolved_dtype(s), t["optim_state"], t["grad_checkpoint"],
                               t["fused_update"], adapters)

    parts = estimate_with()
    if s.backend == "torch" and (s.device or "").startswith("cuda"):  # the arrays live on the GPU
        where, available = s.device, memory.cuda_available_bytes(s.device)
    else:
        where, available = "this machine", memory.available_bytes()
    log(f"{memory.format_plan(parts)}\n  (micro-batches of at most "
        f"{memory.batch_tokens_bound(lengths, s.batch_size, max_len)} tokens)\n"
        f"{memory.verdict(parts, available, where)}")
    if s.memory_check:
        memory.check_fits(parts, available, where, s, estimate_with)
    return parts


def dry_run(s: Settings, log=print) -> dict:
    """`minisft finetune --dry-run`: the data tokenized, the memory plan printed (and checked); no
    model, no run directory."""
    check_dtype(s, log)
    _, split = load_splits(s.data, s.cache_dir)
    return memory_plan(s, architecture(s), encode_records(split.train, get_style(s.prompt_style), s.mask_prompt), log)


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


def finish(s, out, model, style, raw_split, split, records, times, tokens_seen, step, log, run) -> dict:
    """The end of a run: HF export (a LoRA run: the adapter in PEFT's layout), test-set responses, the
    loss plot, the summary (with run: world_size, the target tokens each rank trained on, the batches
    that had no trained target)."""
    if model.lora is not None:
        lora.save_adapter(model, out / "adapter")
    else:
        model.save_pretrained(out / "hf")
    n = len(split.test) if s.responses is None else min(s.responses, len(split.test))
    if n:
        prompts = [style.prompt(r["messages"]) for r in split.test[:n]]
        answers = generate_responses(model, prompts, tokenizer.encode, tokenizer.decode, s.max_new_tokens)
        entries = [dict(rec, model_response=a) for rec, a in zip(raw_split.test[:n], answers)]
        write_json(out / "instruction-data-with-response.json", entries)
    evals = [r for r in records if r["kind"] == "eval"]
    steps = [r for r in records if r["kind"] == "step"]
    note = plot_losses(evals, steps[-1]["epoch"] if steps else 0, out / "loss-plot.png")
    if note:
        log(note)
    rate = times.tokens_per_s()
    # tokens_per_second: the steps after each start's first (compiling/warm-up) step, timed apart
    summary = dict(steps=step, train_seconds=round(times.total_s, 3),
                   first_step_seconds=round(times.first_s, 3), tokens_seen=tokens_seen,
                   tokens_per_second=round(rate, 1) if rate else None,
                   final_eval_step=evals[-1]["step"], final_train_loss=evals[-1]["train_loss"],
                   final_val_loss=evals[-1]["val_loss"], last_step_loss=steps[-1]["loss"] if steps else None,
                   responses=n, **run, **measured_memory(model))
    write_json(out / "summary.json", summary, indent=2)
    log(f"done: {step} steps in {times.describe()}; train loss {summary['final_train_loss']:.3f}, val loss "
        f"{summary['final_val_loss']:.3f} at step {summary['final_eval_step']} (estimates on --eval-iter batches); "
        f"outputs in {out}")
    return summary
