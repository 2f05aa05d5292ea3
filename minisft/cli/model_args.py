"""Arguments shared by the commands that run a trained model (generate, chat, eval): where the model
comes from, how to sample, which split; and loading the model they name."""
import json
import math
import sys
from pathlib import Path

from .. import chat_template, lora, tokenizer
from ..backends import AUTO, BACKENDS, dtype_warning
from ..chat_template import CHAT_TEMPLATE_HELP, MODEL, folder_template
from ..checkpoint import load_checkpoint
from ..config import GPTConfig
from ..data import DEFAULT_DATA_URL
from ..errors import MinisftError
from ..model import GPT
from ..pretrained import PRESETS, source_folder
from ..prompts import STYLES

SPLITS = ("train", "val", "test", "all")


def add_model_args(p) -> None:
    p.add_argument("--checkpoint", help="a minisft training checkpoint (.h5)")
    p.add_argument("--weights", help="a preset (downloads its weights), a Hugging Face folder (GPT-2, Llama, "
                                     "Qwen2, Qwen3) or a .safetensors file; with a LoRA --checkpoint, its base "
                                     "(default: the one it records; checked against its sha256)")
    p.add_argument("--model", choices=list(PRESETS), help="the shape of a bare .safetensors file")
    p.add_argument("--backend", default=AUTO, choices=(AUTO,) + BACKENDS,
                   help="engine backend (default auto: torch on a CUDA GPU, else numba)")
    p.add_argument("--device", default=None, help="torch device: cpu, cuda, mps")
    p.add_argument("--dtype", default=None, choices=("float32", "float64", "bfloat16"),
                   help="compute dtype (default: the checkpoint's, or float32)")
    p.add_argument("--cache-dir", default=None, help="download cache (default: $MINISFT_CACHE_DIR or ~/.cache/minisft)")
    add_prompt_args(p)
    p.add_argument("--adapter", help="a LoRA adapter folder (PEFT's layout, minisft's or PEFT's) applied on "
                                     "top of the weights, without merging")


def add_prompt_args(p) -> None:
    """How prompts are rendered: a prompt style or a chat template (see prompt_format)."""
    p.add_argument("--prompt-style", default=None, choices=list(STYLES),
                   help="prompt style (default: a --checkpoint's run's, the model folder's own chat template, "
                        "or alpaca)")
    p.add_argument("--chat-template", default=None, help=CHAT_TEMPLATE_HELP)


def prompt_format(args, tok) -> tuple:
    """(the PromptStyle or ChatTemplate named by --prompt-style / --chat-template, the tokenizer for its
    text). Neither given: the one a --checkpoint's run trained with, else the model folder's own
    template, else alpaca (what finetune's defaults pick)."""
    if args.chat_template is not None and args.prompt_style is not None:
        raise MinisftError("--chat-template and --prompt-style both name how prompts are rendered: pass one")
    style, template = args.prompt_style, args.chat_template
    if style is None and template is None:
        run = _run_settings(args)
        style, template = run.get("prompt_style"), run.get("chat_template")
        if style is None and template is None and folder_template(getattr(tok, "folder", None)) is not None:
            template = MODEL
    return chat_template.prompt_format(style, template, tok)


def mask_of(args, style) -> str:
    """--mask-prompt, by default: assistant turns only for a chat template, every token for a style."""
    return args.mask_prompt or ("assistant" if isinstance(style, chat_template.ChatTemplate) else "none")


def add_data_args(p, split: str) -> None:
    p.add_argument("--data", default=DEFAULT_DATA_URL, help="instruction data: a file or URL")
    p.add_argument("--split", default=split, choices=SPLITS, help="which part of the book's split")


def add_sampling_args(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest response")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the book)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=123, help="sampling seed")


def load_model(args):
    if not (args.checkpoint or args.weights):
        raise MinisftError("one of --checkpoint or --weights is required")
    try:
        if args.checkpoint and lora.is_checkpoint(args.checkpoint):
            if args.adapter:
                raise MinisftError("--adapter: a LoRA checkpoint already carries its adapter")
            return lora.model_from_checkpoint(args.checkpoint, backend=args.backend, dtype=args.dtype,
                                              device=args.device, weights=args.weights, cache_dir=args.cache_dir)
        if args.checkpoint and args.weights:
            raise MinisftError(f"--weights: {args.checkpoint} is a full fine-tuning checkpoint, it holds every "
                               "weight; --weights goes with a LoRA checkpoint, as its base")
        if args.checkpoint:
            model = load_checkpoint(args.checkpoint, backend=args.backend, dtype=args.dtype, device=args.device,
                                    load_optimizer=False)[0]
        else:
            model = GPT.from_pretrained(args.weights, backend=args.backend, dtype=args.dtype or "float32",
                                        cache_dir=args.cache_dir, device=args.device, model=args.model)
    except (ValueError, ImportError) as e:  # a backend or device that cannot run here
        raise MinisftError(str(e)) from None
    warning = dtype_warning(model.dtype, model.B.name, model.B.device.type if model.B.name == "torch" else None)
    if warning:
        print(f"minisft: warning: {warning}", file=sys.stderr)
    if args.adapter:
        lora.load_adapter(model, args.adapter)
    return model


def model_tokenizer(args, model) -> tokenizer.Tokenizer:
    """The tokenizer of the model load_model built: GPT-2's, or a Llama-family model's tokenizer.json
    from --weights DIR, or for a --checkpoint from the folder its run started from (settings.json)."""
    return tokenizer.for_model(model.cfg, model_folder(args, model))


def model_folder(args, model) -> Path | None:
    """The Hugging Face folder a Llama-family model's tokenizer files are in (see model_tokenizer)."""
    folder = source_folder(args.weights, None)
    if folder is None and args.checkpoint and not isinstance(model.cfg, GPTConfig):
        started = _run_settings(args)
        folder = source_folder(started.get("weights"), started.get("model"), getattr(args, "cache_dir", None))
    return folder


def _run_settings(args) -> dict:
    """The settings.json of the run a --checkpoint belongs to ({} without one; data inspect has none)."""
    if not getattr(args, "checkpoint", None):
        return {}
    run = Path(args.checkpoint).resolve().parent.parent
    try:
        started = json.loads((run / "settings.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return started if isinstance(started, dict) else {}


def sampling(args) -> dict:
    if args.max_new_tokens < 1:
        raise MinisftError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise MinisftError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise MinisftError(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:  # NaN fails this too
        raise MinisftError(f"--top-p must be in (0, 1], got {args.top_p}")
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def check_top_k(args, model) -> None:
    """--top-k against the loaded model's vocabulary, before any token is generated."""
    if args.top_k is not None and args.top_k > model.cfg.vocab_size:
        raise MinisftError(f"--top-k {args.top_k} is more than the model's {model.cfg.vocab_size} tokens")


def pick(split, name):
    return split.train + split.val + split.test if name == "all" else getattr(split, name)
