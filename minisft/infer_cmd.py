"""`minisft generate`, `minisft chat` and `minisft eval`: a trained model (a checkpoint, or weights)
answering the data's prompts, a person, or scoring held-out loss."""
import json
from functools import partial

from tqdm import tqdm

from backends import BACKENDS

from . import tokenizer
from .config import PRESETS
from .data import DEFAULT_DATA_URL, Loader, collate_examples, encode_records, load_splits
from .errors import MinisftError
from .files import write_json
from .prompts import MASKS, STYLES, get_style

SPLITS = ("train", "val", "test", "all")


def add_model_args(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a minisft training checkpoint (.h5)")
    src.add_argument("--weights", help="a preset (downloads OpenAI's weights), an HF GPT-2 folder or a .safetensors file")
    p.add_argument("--model", choices=list(PRESETS), help="the shape of a bare .safetensors file")
    p.add_argument("--backend", default="numpy", choices=BACKENDS)
    p.add_argument("--device", default=None, help="torch device: cpu, cuda, mps")
    p.add_argument("--dtype", default=None, help="float32, float64, bfloat16 (default: the checkpoint's, or float32)")
    p.add_argument("--cache-dir", default=None, help="download cache (default: $MINISFT_CACHE_DIR or ~/.cache/minisft)")
    p.add_argument("--prompt-style", default="alpaca", choices=list(STYLES))


def add_sampling_args(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the book)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=123)


def load_model(args):
    from .checkpoint import load_checkpoint
    from .model import GPT

    try:
        if args.checkpoint:
            return load_checkpoint(args.checkpoint, backend=args.backend, dtype=args.dtype, device=args.device,
                                   load_optimizer=False)[0]
        return GPT.from_pretrained(args.weights, backend=args.backend, dtype=args.dtype or "float32",
                                   cache_dir=args.cache_dir, device=args.device, model=args.model)
    except (ValueError, ImportError) as e:  # a backend or device that cannot run here
        raise MinisftError(str(e)) from None


def sampling(args) -> dict:
    if args.max_new_tokens < 1:
        raise MinisftError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0 or (args.top_k is not None and args.top_k < 1) or (
            args.top_p is not None and not 0 < args.top_p <= 1):
        raise MinisftError("sampling: --temperature must be >= 0, --top-k >= 1, --top-p in (0, 1]")
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def pick(split, name):
    return split.train + split.val + split.test if name == "all" else getattr(split, name)


# ---- generate -------------------------------------------------------------------------------------------
def run_generate(args) -> int:
    from .generate import generate_responses

    opts = sampling(args)
    model = load_model(args)
    raw, records = (pick(s, args.split) for s in load_splits(args.data, args.cache_dir))
    n = len(records) if args.limit is None else min(args.limit, len(records))
    style = get_style(args.prompt_style)
    render = style.format_input if args.book_prompt else style.prompt
    prompts = [render(r["messages"]) for r in records[:n]]
    answers = generate_responses(model, prompts, tokenizer.encode, tokenizer.decode, args.max_new_tokens,
                                 batch_size=args.batch_size, book_prompt=args.book_prompt, rng=args.seed, **opts)
    write_json(args.out, [dict(entry, model_response=a) for entry, a in zip(raw[:n], answers)])
    print(f"wrote {n} responses to {args.out}")
    return 0


# ---- chat ------------------------------------------------------------------------------------------------
def run_chat(args) -> int:
    from .generate import chat_loop

    opts = sampling(args)
    style = get_style(args.prompt_style)
    model = load_model(args)
    print(f"chatting in the {style.name} style; /quit or end of input to stop")
    chat_loop(model, lambda message: style.prompt([{"role": "user", "content": message}]), tokenizer.encode,
              tokenizer.decode, max_new_tokens=args.max_new_tokens, rng=args.seed, **opts)
    return 0


# ---- eval ------------------------------------------------------------------------------------------------
def run_eval(args) -> int:
    from .evaluate import evaluate_loss

    model = load_model(args)
    records = pick(load_splits(args.data, args.cache_dir)[1], args.split)
    max_len = min(args.max_length, model.cfg.context_length)
    examples = encode_records(records, args.prompt_style, args.mask_prompt)
    loader = Loader(examples, args.batch_size, shuffle=False, drop_last=False,
                    collate=partial(collate_examples, packed=True, allowed_max_length=max_len))
    loss, ppl, n = evaluate_loss(model, tqdm(loader, desc="eval", unit="batch", disable=None, leave=False))
    result = dict(split=args.split, records=len(records), targets=n, loss=loss, perplexity=ppl)
    print(json.dumps(result))
    return 0


def register(sub) -> None:
    g = sub.add_parser("generate", help="answer a data split's prompts; writes the book's "
                                        "instruction-data-with-response.json format")
    add_model_args(g)
    add_sampling_args(g)
    g.add_argument("--data", default=DEFAULT_DATA_URL, help="instruction data: a file or URL")
    g.add_argument("--split", default="test", choices=SPLITS)
    g.add_argument("--limit", type=int, default=None, help="only the first N entries of the split")
    g.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    g.add_argument("--book-prompt", action="store_true",
                   help="the book exactly: prompt without the response header, then drop '### Response:' and strip")
    g.add_argument("--out", required=True, help="output JSON file")
    g.set_defaults(func=run_generate)

    c = sub.add_parser("chat", help="talk to a model in its prompt style, tokens streamed as generated")
    add_model_args(c)
    add_sampling_args(c)
    c.set_defaults(func=run_chat)

    e = sub.add_parser("eval", help="token-weighted loss and perplexity on a data split")
    add_model_args(e)
    e.add_argument("--data", default=DEFAULT_DATA_URL, help="instruction data: a file or URL")
    e.add_argument("--split", default="val", choices=SPLITS)
    e.add_argument("--mask-prompt", default="none", choices=MASKS)
    e.add_argument("--max-length", type=int, default=1024)
    e.add_argument("--batch-size", type=int, default=8)
    e.set_defaults(func=run_eval)
