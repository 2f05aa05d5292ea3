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

The code: finetune checks the settings and owns the folder; _finetune reads the data and builds the
model; a Trainer runs one start of the run, its position a TrainState (what a checkpoint carries
besides the weights). The run's kind, FullRun or AdapterRun (LoRA), is chosen once: it attaches the
adapters, and saves, loads and exports what that kind of run trains.
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
from .data import Loader, Split, collate_examples, encode_records, long_records, load_splits
from .errors import MinisftError
from .files import write_json, write_text
from .generate import generate, generate_responses
from .model import GPT
from .optim import AdamW, clip_grad_norm, lr_at
from .plot import plot_losses
from .pretrained import read_pretrained, source_folder
from .progress import progress
from .chat_template import ChatTemplate, check_masks, prompt_format
from .prompts import PromptStyle
from .rundir import Plan, RunLock, checkpoints, plan_run, removed_if_refused, start
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

    def add(self, seconds: float, tokens: int, first: bool) -> None:
        """One step's seconds: a start's first step apart, the others with their tokens."""
        if first:
            self.first_s, self.starts = self.first_s + seconds, self.starts + 1
        else:
            self.steady_s, self.steady_tokens = self.steady_s + seconds, self.steady_tokens + tokens

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


# ---- run kinds: full fine-tuning or adapters -------------------------------------------------------------
class FullRun:
    """Full fine-tuning: every weight trains; a checkpoint holds them all, the export is hf/."""
    adapters = None  # no LoraConfig

    def attach(self, model: GPT, s: Settings) -> None:
        pass  # the model as built is the one trained

    def save(self, path, model: GPT, opt: AdamW, train_state: dict) -> None:
        save_checkpoint(path, model, opt, train_state)

    def load(self, path, model: GPT, opt: AdamW | None = None) -> dict:
        """A checkpoint into model (and opt) -> its train_state."""
        return load_checkpoint(path, model=model, optimizer=opt)[2]

    def export(self, model: GPT, out: Path, tok: tokenizer.Tokenizer) -> None:
        tok.save(model.save_pretrained(out / "hf"))  # a folder transformers and minisft load whole


@dataclasses.dataclass(frozen=True)
class AdapterRun:
    """LoRA: adapters train on frozen base weights; a checkpoint holds the adapters (the base referenced
    by path and sha256), the export is adapter/ in PEFT's layout."""
    adapters: lora.LoraConfig

    def attach(self, model: GPT, s: Settings) -> None:
        # An absolute path: generate, chat, eval and export find the base from any folder.
        base = str(Path(s.weights).resolve()) if s.weights else s.model
        lora.attach(model, self.adapters, seed=s.seed, base_path=base)

    def save(self, path, model: GPT, opt: AdamW, train_state: dict) -> None:
        lora.save_checkpoint(path, model, opt, train_state)

    def load(self, path, model: GPT, opt: AdamW | None = None) -> dict:
        return lora.load_checkpoint(path, model, opt)

    def export(self, model: GPT, out: Path, tok: tokenizer.Tokenizer) -> None:
        lora.save_adapter(model, out / "adapter")  # the base's folder keeps the tokenizer


def run_kind(s: Settings) -> FullRun | AdapterRun:
    return AdapterRun(lora.lora_config(s)) if s.lora_rank is not None else FullRun()


# ---- the run's records ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Best:
    """Early stopping's record: the best val loss so far, its step, the evaluations since it."""
    val_loss: float = math.inf
    step: int | None = None
    since: int = 0


@dataclasses.dataclass
class TrainState:
    """Where a run is, besides its weights, optimizer and loader: what a checkpoint stores for an exact
    resume, and what rank 0 gives every rank at a start so that every rank decides alike."""
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    records: list = dataclasses.field(default_factory=list)  # metrics.jsonl's, up to step
    times: StepTimes = dataclasses.field(default_factory=StepTimes)
    best: Best = dataclasses.field(default_factory=Best)
    empty_batches: int = 0  # batches with no trained target

    @property
    def last_eval(self) -> int:
        return max((r["step"] for r in self.records if r["kind"] == "eval"), default=0)

    def to_dict(self, loader: Loader, s: Settings) -> dict:
        """A checkpoint's train_state: this, the loader's position and the settings (a resume compares them)."""
        return dict(step=self.step, tokens_seen=self.tokens_seen, records=self.records, loader=loader.state_dict(),
                    step_times=dataclasses.asdict(self.times), best=dataclasses.asdict(self.best),
                    settings=s.to_dict(), empty_batches=self.empty_batches)

    @classmethod
    def from_dict(cls, state: dict, loader: Loader) -> "TrainState":
        """The inverse of to_dict, loader put back at its position; keys an older checkpoint lacks take
        their defaults."""
        loader.load_state_dict(state["loader"])
        return cls(step=state["step"], tokens_seen=state["tokens_seen"], records=state["records"],
                   times=StepTimes.from_state(state), best=Best(**state["best"]) if "best" in state else Best(),
                   empty_batches=state.get("empty_batches", 0))


@dataclasses.dataclass
class StartClock:
    """This start's timings (each step's and each evaluation's seconds), for its estimate line."""
    first_step: int  # the step this start begins at
    evals_planned: int
    evals_before_last: int
    steps: list = dataclasses.field(default_factory=list)
    evals: list = dataclasses.field(default_factory=list)
    estimated: bool = False

    def estimate(self, total_steps: int) -> str | None:
        """The estimate line, once: when ESTIMATE_AFTER steady steps and, where there are two, an
        evaluation besides the first are timed."""
        if self.estimated or len(self.steps) <= ESTIMATE_AFTER or len(self.evals) < min(2, self.evals_before_last):
            return None
        self.estimated = True
        return estimate_line(total_steps - self.first_step, self.steps, self.evals_planned, self.evals)


@dataclasses.dataclass
class Data:
    """A run's data: the splits as read (the responses file copies those records) and validated, the
    prompt style, the train and val examples encoded (and cut or dropped at max_len)."""
    raw: Split
    split: Split
    style: PromptStyle | ChatTemplate
    max_len: int  # the effective max_length: at most the model's context
    train: list
    val: list
    tok: tokenizer.Tokenizer


# ---- a run: its checks and setup -----------------------------------------------------------------------
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


def _finetune(s: Settings, out: Path, plan: Plan, log, dist) -> dict:
    cfg, weights = model_source(s)
    max_len = min(s.max_length, cfg.context_length)
    log("settings:")
    for k, v in s.to_dict().items():
        clamped = f"  (effective {max_len}: the model's context)" if k == "max_length" and max_len < v else ""
        log(f"  {k} = {v!r}{clamped}")
    data = load_data(s, max_len, log, tokenizer.for_model(cfg, model_folder(s)))
    mem_plan = memory_plan(s, cfg, data.train, log)  # refuses before the model takes its memory
    kind = run_kind(s)
    model = build_model(s, cfg, weights)
    del weights  # the model holds its own copy
    kind.attach(model, s)
    trainer = Trainer(s, out, kind, model, data, dist, log)
    trainer.begin(plan)
    trainer.train()
    return trainer.end(memory_estimate_mb=round(sum(mem_plan.values()) / 2**20, 1))


def model_folder(s: Settings) -> Path | None:
    """The Hugging Face folder the run's model comes from (model_source fetched a preset already)."""
    return source_folder(s.weights, s.model if s.init == "pretrained" else None, s.cache_dir)


def load_data(s: Settings, max_len: int, log, tok: tokenizer.Tokenizer) -> Data:
    raw_split, split = load_splits(s.data, s.cache_dir)
    log(f"data: {len(split.train)} train, {len(split.val)} val, {len(split.test)} test records")
    style, tok = prompt_format(s.prompt_style, s.chat_template, tok)
    train_ex = encode_records(split.train, style, s.mask_prompt, tok)
    val_ex = encode_records(split.val, style, s.mask_prompt, tok)
    if isinstance(style, ChatTemplate):
        check_masks(style, [("train", split.train, train_ex), ("val", split.val, val_ex)], tok, s, log)
    train_ex, val_ex = (report_long(name, ex, recs, style, max_len, s, log, tok)
                        for name, ex, recs in (("train", train_ex, split.train), ("val", val_ex, split.val)))
    return Data(raw_split, split, style, max_len, train_ex, val_ex, tok)


def build_model(s: Settings, cfg: GPTConfig, weights: dict | None) -> GPT:
    try:
        model = GPT(cfg, backend=s.backend, dtype=s.dtype, seed=s.seed, device=s.device, params=weights)
    except ImportError as e:  # a backend whose library is not installed here
        raise MinisftError(f"setting backend: {s.backend} cannot run here ({e})") from None
    model.grad_checkpoint = s.grad_checkpoint
    return model


def report_long(name, examples, records, style, max_len, s, log, tok) -> list:
    """Say how many records max_len cuts and how many lose their whole response; drop them with
    --drop-long. Refuse a training split in which no record keeps a trained target."""
    cut, lost = long_records(examples, records, style, max_len, tok)
    if cut:
        first = ", ".join(map(str, lost[:5] or cut[:5]))
        log(f"{name}: {len(cut)} of {len(examples)} records are longer than max-length {max_len} tokens and are "
            f"{'dropped' if s.drop_long else 'cut'}; {len(lost)} of them lose their whole response "
            f"({name} records {first}{' ...' if len(lost or cut) > 5 else ''})"
            + ("" if s.drop_long else "; --drop-long drops them"))
    if s.drop_long:
        dropped = set(cut)
        examples = [e for i, e in enumerate(examples) if i not in dropped]
    trainable = [e for e in examples if len(e.tokens) <= max_len or e.trained[1:max_len + 1].any()]
    if name == "train" and not trainable:
        raise MinisftError(f"setting max_length: at {max_len} tokens no training record keeps a trained target "
                           f"(mask-prompt {s.mask_prompt} masks everything before the cut); raise --max-length")
    return examples


def resume_from(candidates, kind: FullRun | AdapterRun, model: GPT, opt: AdamW, log) -> tuple[Path, dict]:
    """Load the newest checkpoint that loads whole -> (path, train_state); name the ones skipped."""
    failed = []
    for path in candidates:
        try:
            return path, kind.load(path, model, opt)
        except MinisftError as e:
            log(f"skipping the checkpoint {path.name}: {e}")
            failed.append(path.name)
    raise MinisftError(f"setting resume: none of the checkpoints {', '.join(failed)} loads; start afresh with "
                       "--overwrite")


# ---- the loop ------------------------------------------------------------------------------------------
class Trainer:
    """One start of a run: its model, optimizer and loaders, its TrainState, and the loop's parts."""

    def __init__(self, s: Settings, out: Path, kind: FullRun | AdapterRun, model: GPT, data: Data, dist, log):
        self.s, self.out, self.kind, self.model, self.data, self.dist, self.log = s, out, kind, model, data, dist, log
        collate = dist.shard(partial(collate_examples, packed=True, allowed_max_length=data.max_len,
                                     eos=data.tok.eos))
        self.loader = Loader(data.train, s.batch_size, shuffle=s.shuffle, drop_last=True, seed=s.seed,
                             collate=collate)
        self.eval_loader = partial(Loader, batch_size=s.batch_size, shuffle=False, drop_last=False, collate=collate)
        if len(self.loader) == 0:
            raise MinisftError(f"setting batch_size: {s.batch_size} is more than the {len(data.train)} training "
                               "records")
        self.opt = AdamW(model, lr=s.lr, weight_decay=s.weight_decay, decay=s.decay, state=s.optim_state)
        self.steps_per_epoch = math.ceil(len(self.loader) / s.grad_accum)
        epochs_steps = s.epochs * self.steps_per_epoch
        self.total_steps = epochs_steps if s.max_steps is None else min(s.max_steps, epochs_steps)
        cfg = model.cfg
        log(f"model: {s.model or s.weights} ({cfg.n_layers} layers, d={cfg.emb_dim}, context {cfg.context_length}; "
            f"{model.num_params():,} parameters, {s.init} init), backend {model.B.name} {model.dtype}; "
            f"{self.steps_per_epoch} steps per epoch, {self.total_steps} steps")
        log(lora.trainable_parameters(model))
        self.state = TrainState()
        self.clock = self.bar = self.metrics = None  # set by begin and train

    def begin(self, plan: Plan) -> None:
        """This start's position: rank 0 resumes from the newest checkpoint that loads and writes the
        folder's start; every rank takes rank 0's position; metrics.jsonl is cut back to it."""
        s, dist, log = self.s, self.dist, self.log
        if s.resume and dist.main:
            path, state = resume_from(plan.checkpoints, self.kind, self.model, self.opt, log)
            self.state = TrainState.from_dict(state, self.loader)
            log(f"resuming from {path} at step {self.state.step}")
        if dist.main:
            start(s, plan, log, dist.record())  # every check passed: the folder is written from here on
        self.state = dist.sync_start(self.model, self.opt, self.loader, self.state)
        step = self.state.step
        self.clock = StartClock(step, *evaluations_in(step, self.total_steps, s.eval_freq))
        # metrics.jsonl holds exactly the records up to the current step (a resumed run drops any
        # records written after its checkpoint, so every step appears once).
        if dist.main:
            write_text(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.state.records))
        self.metrics = open(self.out / "metrics.jsonl" if dist.main else os.devnull, "a", encoding="utf-8")

    def stopped(self) -> bool:
        """Early stopping's verdict: early_stop evaluations in a row without a better val loss."""
        return self.s.early_stop is not None and self.state.best.since >= self.s.early_stop

    def train(self) -> None:
        """Steps to total_steps or an early stop, then the last weights' evaluation; an interrupt names
        the checkpoint to resume from. The last step's checkpoint is written at the end."""
        st, out = self.state, self.out
        if self.model.B.name == "numba" and st.step < self.total_steps and not self.stopped():
            self.log("numba: the first step compiles the kernels, or loads them from numba's cache after the first "
                     "run ...")
        self.bar = progress(self.total_steps, "finetune", "step", initial=st.step, enabled=self.dist.main)
        try:
            while st.step < self.total_steps and not self.stopped():
                self.train_epoch()
            # The reported losses are the last weights': evaluate them unless the last step just did.
            # The last step's checkpoint is already written: a longer run resumed from it has no such evaluation.
            if st.last_eval != st.step:
                self.evaluate((st.step - 1) // self.steps_per_epoch + 1)
        except KeyboardInterrupt:
            last = checkpoints(out)
            self.log(f"interrupted at step {st.step}; the last checkpoint is {last[-1] if last else 'none'}: "
                     f"continue with --resume --out {out}")
            raise
        finally:
            self.bar.close()
            self.metrics.close()
        if not checkpoints(out) or checkpoints(out)[-1].name != f"step-{st.step:06d}.h5":
            self.save()

    def train_epoch(self) -> None:
        """The rest of the loader's epoch, one step per window of grad_accum batches, then (the epoch
        complete) the book's sample."""
        epoch = self.loader.epoch
        for window in windows(iter(self.loader), self.s.grad_accum):
            self.step(window, epoch + 1)
            if self.state.step == self.total_steps or self.stopped():
                break
        if self.dist.main and (self.loader.epoch > epoch or self.loader.batch == len(self.loader)):
            self.bar.write(sample_text(self.model, self.data.style, self.data.split.val[0], self.data.tok))

    def step(self, window: list, epoch: int) -> None:
        """One step on a window, its records, evaluation and checkpoint. A window with no trained target
        in it still makes a step (the schedule and the checkpoints keep their places), without an update
        and so without an evaluation."""
        s, st = self.s, self.state
        t0 = time.perf_counter()
        n_valid, n_tokens = self.dist.count(window)  # over every rank's slice of the window
        if n_valid:
            st.empty_batches += sum(not b.num_valid for b in window)  # a batch with none adds nothing
            lr = lr_at(st.step + 1, s.lr, s.schedule, s.warmup_steps, self.total_steps, s.min_lr)
            loss, grad_norm = self.optimizer_step(window, n_valid, lr)
            st.step += 1
            self.clock.steps.append(time.perf_counter() - t0)
            st.times.add(self.clock.steps[-1], n_tokens, first=len(self.clock.steps) == 1)
            st.tokens_seen += n_tokens
            self.emit(dict(kind="step", step=st.step, epoch=epoch, loss=loss, lr=lr, tokens_seen=st.tokens_seen,
                           grad_norm=grad_norm, **measured_memory(self.model)))
            rate = {"tok_s": f"{st.times.tokens_per_s():,.0f}"} if st.times.steady_s else {}  # steady steps only
            self.bar.set_postfix(loss=f"{loss:.3f}", **rate)
        else:
            st.empty_batches += len(window)
            st.step += 1
            self.emit(dict(kind="skip", step=st.step, epoch=epoch, reason="no trained target in the batch"))
        self.bar.update(1)
        if n_valid and (st.step - 1) % s.eval_freq == 0:  # the book's global_step % eval_freq == 0
            self.evaluate(epoch)
            if self.stopped() and self.dist.main:
                self.bar.write(f"early stop: the val loss has not improved for {s.early_stop} evaluations; the "
                               f"best, {st.best.val_loss:.3f} at step {st.best.step}, is in "
                               f"{best_checkpoint(self.out)}")
        line = self.clock.estimate(self.total_steps)
        if line and self.dist.main:
            self.bar.write(line)
        if st.step % s.ckpt_every == 0 or st.step == self.total_steps or self.stopped():
            self.save()

    def optimizer_step(self, window: list, n_valid: int, lr: float) -> tuple[float, float]:
        """The window's gradient, each micro-batch's scaled by 1/(valid targets in the whole window), and
        AdamW's update -> (loss, gradient norm). A non-finite loss or norm stops the run before the update."""
        s, model = self.s, self.model
        if s.fused_update:  # each tensor updated in the backward (a bad loss is seen after it)
            loss, grad_norm = self.opt.fused_step(window[0], lr=lr)
        else:
            model.zero_grad()
            loss = sum(model.forward_backward(b, grad_scale=1.0 / n_valid)[0] for b in window if b.num_valid)
            loss = self.dist.reduce_gradients(model, loss) / n_valid
            grad_norm = clip_grad_norm(model, s.grad_clip)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            last = checkpoints(self.out)
            raise MinisftError(f"the training loss became {loss} (gradient norm {grad_norm}) at step "
                               f"{self.state.step + 1}; stopping without updating the weights. The last good "
                               f"checkpoint is {last[-1] if last else 'none (no step was saved yet)'}")
        if not s.fused_update:
            self.opt.step(lr=lr)
        return loss, grad_norm

    def evaluate(self, epoch: int) -> None:
        """The book's evaluation of the weights at this step; with early stopping, its val loss tracked."""
        s, st, dist = self.s, self.state, self.dist
        t0 = time.perf_counter()
        train_loss = mean_batch_loss(self.model, self.eval_loader(self.data.train), s.eval_iter, dist)
        val_loss = mean_batch_loss(self.model, self.eval_loader(self.data.val), s.eval_iter, dist)
        self.clock.evals.append(time.perf_counter() - t0)
        self.emit(dict(kind="eval", step=st.step, epoch=epoch, train_loss=train_loss, val_loss=val_loss,
                       tokens_seen=st.tokens_seen))
        if dist.main:
            self.bar.write(f"Ep {epoch} (Step {st.step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        if s.early_stop is not None:  # the reduced val loss: every rank decides alike
            self.early_stop(val_loss)

    def early_stop(self, val_loss: float) -> None:
        """A val loss below the best so far is the new best, saved as best.h5; any other counts one more
        evaluation without improvement."""
        st = self.state
        if val_loss < st.best.val_loss:
            st.best = Best(val_loss, st.step)
            self.save(best_checkpoint(self.out))
        else:
            st.best.since += 1

    def emit(self, record: dict) -> None:
        self.state.records.append(record)
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()

    def save(self, path: Path | None = None) -> None:
        """Rank 0: this step's checkpoint (or path), keeping the last keep_last step checkpoints."""
        if not self.dist.main:
            return
        step_path = self.out / "checkpoints" / f"step-{self.state.step:06d}.h5"
        self.kind.save(path or step_path, self.model, self.opt, self.state.to_dict(self.loader, self.s))
        for old in checkpoints(self.out)[:-self.s.keep_last]:
            old.unlink()

    def end(self, memory_estimate_mb: float) -> dict:
        """After the last step: rank 0 finishes the run (with --export best, on best.h5's weights) ->
        the summary; another rank returns its counts."""
        s, st, dist, log = self.s, self.state, self.dist, self.log
        dist.close()  # no collective after the last step: the other ranks are done
        run = dict(dist.record(), tokens_per_rank=dist.valid_per_rank)
        if not dist.main:
            return dict(steps=st.step, tokens_seen=st.tokens_seen, rank=dist.rank, **run)
        if s.export == "best":
            self.kind.load(best_checkpoint(self.out), self.model)
            log(f"export: the best checkpoint (val loss {st.best.val_loss:.3f} at step {st.best.step})")
        if st.empty_batches:
            log(f"{st.empty_batches} batches had no trained target (every target masked or cut off) and "
                "contributed nothing")
        return self.finish(dict(run, empty_batches=st.empty_batches, memory_estimate_mb=memory_estimate_mb))

    def finish(self, run: dict) -> dict:
        """The end of a run: the export (hf/, or a LoRA run's adapter/), test-set responses, the loss plot,
        the summary (with run: world_size, the target tokens each rank trained on, the batches that had no
        trained target)."""
        s, out, st, data, model = self.s, self.out, self.state, self.data, self.model
        self.kind.export(model, out, data.tok)
        n = len(data.split.test) if s.responses is None else min(s.responses, len(data.split.test))
        if n:
            prompts = [data.style.prompt(r["messages"]) for r in data.split.test[:n]]
            answers = generate_responses(model, prompts, data.tok.encode, data.tok.decode, s.max_new_tokens,
                                         eos_id=data.tok.stops)
            entries = [dict(rec, model_response=a) for rec, a in zip(data.raw.test[:n], answers)]
            write_json(out / "instruction-data-with-response.json", entries)
        evals = [r for r in st.records if r["kind"] == "eval"]
        steps = [r for r in st.records if r["kind"] == "step"]
        note = plot_losses(evals, steps[-1]["epoch"] if steps else 0, out / "loss-plot.png")
        if note:
            self.log(note)
        rate = st.times.tokens_per_s()
        # tokens_per_second: the steps after each start's first (compiling/warm-up) step, timed apart
        summary = dict(steps=st.step, train_seconds=round(st.times.total_s, 3),
                       first_step_seconds=round(st.times.first_s, 3), tokens_seen=st.tokens_seen,
                       tokens_per_second=round(rate, 1) if rate else None,
                       final_eval_step=evals[-1]["step"], final_train_loss=evals[-1]["train_loss"],
                       final_val_loss=evals[-1]["val_loss"], last_step_loss=steps[-1]["loss"] if steps else None,
                       responses=n, **run, **measured_memory(model))
        write_json(out / "summary.json", summary, indent=2)
        self.log(f"done: {st.step} steps in {st.times.describe()}; train loss {summary['final_train_loss']:.3f}, "
                 f"val loss {summary['final_val_loss']:.3f} at step {summary['final_eval_step']} (estimates on "
                 f"--eval-iter batches); outputs in {out}")
        return summary


# ---- memory --------------------------------------------------------------------------------------------
def memory_plan(s: Settings, cfg: GPTConfig, train_ex, log=print) -> dict:
    """Log the estimated memory per part for these settings (minisft.memory) and whether it fits, and
    with memory_check refuse when it does not. Needs only the tokenized data, not the model."""
    max_len = min(s.max_length, cfg.context_length)
    lengths = [len(e.tokens) + 1 for e in train_ex]  # + the end-of-text each row gets
    adapters = run_kind(s).adapters

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
    cfg = architecture(s)
    style, tok = prompt_format(s.prompt_style, s.chat_template, tokenizer.for_model(cfg, model_folder(s)))
    return memory_plan(s, cfg, encode_records(split.train, style, s.mask_prompt, tok), log)


def measured_memory(model: GPT) -> dict:
    """The peak memory so far, in MiB: the process's resident set, and torch's on a CUDA device."""
    rec = dict(peak_rss_mb=round(memory.peak_rss_bytes() / 2**20, 1))
    cuda = memory.cuda_peak_bytes(model.B)
    if cuda is not None:
        rec["cuda_peak_mb"] = round(cuda / 2**20, 1)
    return rec


def sample_text(model: GPT, style, record, tok: tokenizer.Tokenizer) -> str:
    """The book's generate_and_print_sample: greedy continuation of val[0]'s prompt, one line."""
    prompt = style.format_input(record["messages"])
    ids = tok.encode(prompt)
    new = generate(model, [ids], SAMPLE_TOKENS, eos_id=tok.stops)[0]
    return tok.decode(ids + new).replace("\n", " ")
