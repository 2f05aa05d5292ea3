"""`minisft finetune` settings: one table of names, defaults and help texts, read from a TOML file
(`--config`) and overridden by flags, validated before any work starts.

The defaults are the book's chapter-7 recipe: gpt2-medium from OpenAI's weights, Alpaca prompts, batch
8, AdamW lr 5e-5 and weight decay 0.1 on every tensor, 2 epochs, evaluation every 5 steps on 5
batches, seed 123, shuffled training batches, no clipping, no warmup, a constant learning rate.
"""
import argparse
import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .backends import AUTO, BACKENDS
from .backends.optim_state import DEFAULT, FORMATS, OPTIM_STATES
from .config import GPTConfig
from .data import DEFAULT_DATA_URL as BOOK_DATA_URL
from .distributed import world_size_from_env
from .errors import MinisftError
from .optim import DECAY_CHOICES, SCHEDULES
from .llama import LlamaConfig
from .pretrained import DOWNLOADS, HF_REPOS, LLAMA_HUB, PRESETS, read_config, requested_config
from .chat_template import BUILTIN, CHAT_TEMPLATE_HELP, MODEL, folder_template
from .prompts import MASKS, STYLES

DTYPES = ("float32", "float64", "bfloat16")
DEFAULT_MODEL = "gpt2-medium"  # the book's
# `--demo`: the offline first run. Bundled data, a tiny GPT-2 (the real vocabulary) from a random
# init on the fast CPU backend; a random model needs a larger learning rate than the book's 5e-5.
DEMO = dict(model="gpt2-tiny", init="random", backend="numba", lr=1e-3, eval_freq=25, responses=10,
            out="runs/demo")


def _s(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Settings:
    model: str | None = _s(None, f"model preset: its shape, and which OpenAI weights --init pretrained loads "
                                 f"(default: {DEFAULT_MODEL}, or the architecture in --weights DIR/config.json)",
                           PRESETS)
    init: str = _s("pretrained", "start from OpenAI's weights or from a random GPT-2 init", ("pretrained", "random"))
    weights: str | None = _s(None, "local weights instead of the download: an HF folder or a .safetensors file")
    data: str = _s(BOOK_DATA_URL, "instruction data: a local file or a URL (JSON list, JSONL, ShareGPT, messages); "
                                  "the book's URL is read from the copy bundled with minisft, no download")
    cache_dir: str | None = _s(None, "download cache (default: $MINISFT_CACHE_DIR or ~/.cache/minisft)")
    prompt_style: str | None = _s(None, "prompt template: alpaca (the book), phi3 (exercise 7.1), chatml (default: "
                                        "alpaca, or the --weights folder's own chat template when it has one)",
                                  tuple(STYLES))
    chat_template: str | None = _s(None, CHAT_TEMPLATE_HELP)
    mask_prompt: str | None = _s(None, "which prompt tokens get no loss: none (book), input (book ex. 7.2: up to the "
                                       "end of the input), header (through the response header, as TRL), assistant "
                                       "(only assistant turns; default: none for a prompt style, assistant for a "
                                       "chat template)", MASKS)
    # The mask checks of a chat template's data (minisft.chat_template.check_masks): each refuses a kind of
    # silently wrong mask unless allowed here.
    allow_untrained_records: bool = _s(False, "train although some records train no token")
    allow_empty_turns: bool = _s(False, "train although some assistant turns train no token")
    allow_untrained_end: bool = _s(False, "train although some assistant turns' end token is not trained")
    allow_unstable_template: bool = _s(False, "train with a template that renders a conversation's prefix "
                                              "differently from the whole")
    backend: str = _s(AUTO, "engine backend: auto (torch on a CUDA GPU, else numba), numpy (the readable "
                            "reference), numba (fast on CPUs), torch", (AUTO,) + BACKENDS)
    device: str | None = _s(None, "torch device: cpu, cuda, mps")
    dtype: str = _s(AUTO, "compute dtype: auto (bfloat16 on the numba backend where the CPU has bf16 units and "
                          "oneDNN is installed, pip install 'minisft[bf16]'; else float32), float32, float64, "
                          "bfloat16 (bf16 matmuls, float32 master weights and optimizer: numba, torch)",
                    (AUTO,) + DTYPES)
    epochs: int = _s(2, "passes over the training split")
    batch_size: int = _s(8, "sequences per micro-batch")
    grad_accum: int = _s(1, "micro-batches per optimizer step; the loss is normalised by the valid target "
                            "tokens of the whole window")
    lr: float = _s(5e-5, "peak learning rate")
    weight_decay: float = _s(0.1, "AdamW decoupled weight decay")
    decay: str = _s("all", "tensors that decay: all (book) or matrices (no biases, layernorms, embeddings)",
                    DECAY_CHOICES)
    schedule: str = _s("constant", "learning-rate schedule after warmup", SCHEDULES)
    warmup_steps: int = _s(0, "linear warmup steps")
    min_lr: float = _s(0.0, "learning rate at the end of a linear or cosine decay")
    grad_clip: float | None = _s(None, "clip the global gradient norm to this value (default: off, as the book)")
    max_length: int = _s(1024, "truncate sequences to this many tokens (clamped to the context length)")
    drop_rate: float = _s(0.0, "dropout rate")
    eval_freq: int = _s(5, "evaluate every this many optimizer steps")
    eval_iter: int = _s(5, "batches of train and val per evaluation: the printed losses are estimates on these "
                           "batches (minisft eval scores a whole split)")
    early_stop: int | None = _s(None, "stop when the val loss has not improved for this many evaluations "
                                      "(default: off); the best checkpoint is kept as checkpoints/best.h5")
    export: str = _s("last", "which weights the end-of-run export and responses use: the last step or the best "
                             "val loss (needs evaluations)", ("last", "best"))
    seed: int = _s(123, "seed for init, shuffling and dropout")
    shuffle: bool = _s(True, "shuffle the training batches each epoch (book: yes)")
    max_steps: int | None = _s(None, "stop after this many optimizer steps (smoke runs)")
    out: str = _s("runs/sft", "run directory: settings, metrics.jsonl, checkpoints, export, responses")
    resume: bool = _s(False, "continue from the newest checkpoint in --out")
    ckpt_every: int = _s(50, "checkpoint every this many optimizer steps (and at the end)")
    keep_last: int = _s(2, "checkpoints kept in --out")
    responses: int | None = _s(None, "test-split entries to answer at the end (default: all; 0: none)")
    max_new_tokens: int = _s(256, "longest generated response")
    # ---- run-folder recovery and long records (minisft/rundir.py)
    overwrite: bool = _s(False, "start afresh in an --out that holds a run: its checkpoints, metrics and "
                                "outputs are removed first")
    drop_long: bool = _s(False, "drop records longer than --max-length instead of cutting them (a cut record "
                                "may lose its whole response)")
    # LoRA (minisft/lora.py): train low-rank adapters beside frozen base weights instead of every weight
    lora_rank: int | None = _s(None, "train LoRA adapters of this rank; every base weight stays frozen "
                                     "(default: off, full fine-tuning)")
    lora_alpha: float | None = _s(None, "LoRA scale numerator: updates are scaled by alpha / rank (default: "
                                        "alpha = rank, scale 1)")
    lora_dropout: float | None = _s(None, "dropout on the adapters' input (default: 0)")
    lora_targets: str | None = _s(None, "comma-separated layers to adapt: GPT-2's c_attn (whole q|k|v), c_attn.q, "
                                        "c_attn.k, c_attn.v, attn.c_proj, c_fc, mlp.c_proj; the Llama family's "
                                        "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; lm_head; "
                                        "or all (default: PEFT's: c_attn for GPT-2, q_proj,v_proj for Llama)")
    lora_rslora: bool | None = _s(None, "rank-stabilised LoRA: scale alpha / sqrt(rank)")
    lora_preset: str | None = _s(None, "book-7.4: the book's exercise 7.4 (appendix E's LoRA): rank 16, alpha 16, "
                                       "every linear layer including the head; flags given override it")
    # Distributed runs (torchrun; see minisft.distributed).
    dist_timeout: float = _s(600.0, "seconds a rank waits in a collective before it gives up on the others "
                                    "(longer than rank 0's longest solo stretch: a checkpoint, a sample)")
    # ---- memory (minisft.memory): what a step holds, and the options that shrink it ----
    grad_checkpoint: bool = _s(False, "activation checkpointing: keep only each block's input, recompute the block "
                                      "in the backward (same gradients, about one more forward of compute)")
    optim_state: str = _s(DEFAULT, "AdamW moments: fp32, bf16 (stochastic rounding) or 8bit (block-wise "
                                  "quantized); master weights stay float32", OPTIM_STATES)
    fused_update: bool = _s(False, "update each tensor as soon as its gradient is complete in the backward, so no "
                                   "full set of gradients is held (needs --grad-accum 1, no --grad-clip)")
    memory_check: bool = _s(True, "refuse to start when the estimated memory exceeds what is available")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per setting (--batch-size ...), default None so only given flags override."""
    p.add_argument("--config", help="TOML file with settings (keys as the flag names, - or _)")
    p.add_argument("--demo", action="store_true",
                   help="the offline first run: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO.items())
                        + " (flags and --config still override)")
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        kind = _kind(f)
        help = f.metadata["help"]
        if "default" not in help:
            shown = "on" if f.default is True else "off" if f.default is False or f.default is None else f.default
            help += f" (default: {shown})"
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            p.add_argument(flag, type=kind, default=None, choices=f.metadata["choices"], help=help)


def _kind(f):
    """The value type of a setting: str, int, float or bool (`int | None` -> int)."""
    args = [a for a in typing.get_args(f.type) if a is not type(None)]
    return args[0] if args else f.type


def resolve(args: argparse.Namespace, base: dict | None = None) -> Settings:
    """Defaults (or base: a saved run's settings), then what the user set (see `given`)."""
    values = {n: v for n, v in (base or {}).items() if n in FIELDS}
    values.update(given(args))
    return validate(Settings(**values))


def given(args: argparse.Namespace) -> dict:
    """The settings the user set: --demo's, then the TOML file's, then the flags'."""
    values = dict(DEMO) if getattr(args, "demo", False) else {}
    if getattr(args, "config", None):
        values.update(read_toml(args.config))
    values.update({n: getattr(args, n) for n in FIELDS if getattr(args, n, None) is not None})
    return values


def read_toml(path) -> dict:
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise MinisftError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise MinisftError(f"config file {path} is a folder; give the TOML file in it") from None
    except OSError as e:
        raise MinisftError(f"config file {path} cannot be read ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise MinisftError(f"config file {path} is not valid TOML: {e}") from None
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise MinisftError(f"config file {path}: unknown setting {key!r}")
        kind = _kind(FIELDS[name])
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise MinisftError(f"config file {path}: setting {key!r} must be {kind.__name__}, got {value!r}")
        values[name] = value
    return values


def architecture(s: Settings) -> GPTConfig | LlamaConfig:
    """The model's shape: the --model preset's, or without one the --weights folder's config.json."""
    if s.model is None:
        cfg = read_config(Path(s.weights) / "config.json")
        return dataclasses.replace(cfg, drop_rate=s.drop_rate) if isinstance(cfg, GPTConfig) else cfg
    cfg = requested_config(s.model)
    return dataclasses.replace(cfg, drop_rate=s.drop_rate) if isinstance(cfg, GPTConfig) else cfg


def validate(s: Settings) -> Settings:
    """Refuse bad values before any work starts, naming the setting."""
    def bad(name, why):
        raise MinisftError(f"setting {name.replace('_', '-')}: {why}")

    for name, f in FIELDS.items():
        choices, value = f.metadata["choices"], getattr(s, name)
        if choices and value not in choices and not (value is None and f.default is None):
            bad(name, f"{value!r} is not one of {', '.join(choices)}")
    for name, f in FIELDS.items():  # NaN passes every comparison below; infinity is no setting
        value = getattr(s, name)
        if _kind(f) is float and value is not None and not math.isfinite(value):
            bad(name, f"must be a finite number, got {value}")
    for name in ("epochs", "batch_size", "grad_accum", "max_length", "eval_freq", "eval_iter", "ckpt_every",
                 "keep_last", "max_new_tokens"):
        if getattr(s, name) < 1:
            bad(name, f"must be at least 1, got {getattr(s, name)}")
    for name in ("lr", "weight_decay", "min_lr", "warmup_steps"):
        if getattr(s, name) < 0:
            bad(name, f"must not be negative, got {getattr(s, name)}")
    if s.lr == 0:
        bad("lr", "must be positive")
    if s.min_lr > s.lr:
        bad("min_lr", f"{s.min_lr} is above lr {s.lr}")
    if s.grad_clip is not None and s.grad_clip <= 0:
        bad("grad_clip", f"must be positive, got {s.grad_clip}")
    if s.max_steps is not None and s.max_steps < 1:
        bad("max_steps", f"must be at least 1, got {s.max_steps}")
    if s.responses is not None and s.responses < 0:
        bad("responses", f"must not be negative, got {s.responses}")
    if not 0.0 <= s.drop_rate < 1.0:
        bad("drop_rate", f"must be in [0, 1), got {s.drop_rate}")
    if s.overwrite and s.resume:
        bad("overwrite", "--overwrite starts afresh, --resume continues: pass one of them")
    if s.dtype == "bfloat16" and s.backend == "numpy":
        bad("dtype", "bfloat16 needs --backend numba, torch or auto")
    if s.device not in (None, "cpu") and s.backend not in ("torch", "auto"):
        bad("device", f"{s.device!r} needs --backend torch")
    lean_state = FORMATS[s.optim_state].lean  # a known name: the choices are checked first
    if lean_state and s.dtype == "float64":
        bad("optim_state", f"{s.optim_state} moments need float32 master weights: use --dtype float32 (or bfloat16 "
                           "on torch)")
    if s.fused_update and (s.grad_accum != 1 or s.grad_clip is not None):
        bad("fused_update", "needs --grad-accum 1 and no --grad-clip: both need every gradient before any update")
    if s.lora_rank is not None and (s.fused_update or lean_state):
        bad("fused_update" if s.fused_update else "optim_state", "does not apply to LoRA runs: their gradients "
            "and moments are the adapters', a few MB at most")
    if world_size_from_env() > 1 and (s.fused_update or lean_state):
        bad("fused_update" if s.fused_update else "optim_state", "is not supported in a distributed run yet: the "
            "ranks reduce a full set of fp32-state gradients; run it in one process")
    if s.weights is not None and not Path(s.weights).exists():
        bad("weights", f"{s.weights} does not exist")
    if s.early_stop is not None and s.early_stop < 1:
        bad("early_stop", f"must be at least 1, got {s.early_stop}")
    if s.chat_template is not None and s.prompt_style is not None:
        bad("chat_template", "--chat-template and --prompt-style both name how prompts are rendered: pass one")
    if s.chat_template not in (None, MODEL, *BUILTIN) and not Path(s.chat_template).is_file():
        bad("chat_template", f"{s.chat_template!r} is neither a built-in ({', '.join(BUILTIN)}, {MODEL}) nor a file")
    if s.chat_template is None and s.prompt_style is None:  # a model is tuned in the format it was made with
        folder = s.weights if s.weights is not None and Path(s.weights).is_dir() else None
        s = dataclasses.replace(s, **({"chat_template": MODEL} if folder_template(folder) else
                                      {"prompt_style": "alpaca"}))
    if s.mask_prompt is None:
        s = dataclasses.replace(s, mask_prompt="assistant" if s.chat_template else "none")
    if s.model is None and not (s.weights is not None and Path(s.weights).is_dir()):
        s = dataclasses.replace(s, model=DEFAULT_MODEL)  # a folder's config.json names its architecture
    if s.init == "pretrained" and s.weights is None and s.model not in HF_REPOS and s.model not in LLAMA_HUB:
        bad("model", f"no pretrained weights exist for {s.model} (the downloads are {DOWNLOADS}); pass --init "
                     "random to train it from a random init")
    if "://" not in s.data and Path(s.data).is_dir():
        bad("data", f"{s.data} is a folder; give the data file in it")
    if "://" not in s.data and not Path(s.data).is_file():
        bad("data", f"{s.data} is not a file")
    if s.dist_timeout <= 0:
        bad("dist_timeout", f"must be positive, got {s.dist_timeout}")
    from .lora import check_settings
    return check_settings(s)
