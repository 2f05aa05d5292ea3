"""`minisft generate`: a trained model answers a data split's prompts, written in the book's
instruction-data-with-response.json format."""
from ..data import load_splits
from ..files import write_json
from ..generate import generate_responses
from .checks import at_least, output_file
from .model_args import (add_data_args, add_model_args, add_sampling_args, check_top_k, load_model, model_tokenizer,
                         pick, prompt_format, sampling)


def run(args) -> int:
    opts = sampling(args)
    at_least(args, "batch_size", 1)
    at_least(args, "limit", 0)
    output_file(args.out)
    model = load_model(args)
    tok = model_tokenizer(args, model)
    check_top_k(args, model)
    raw, records = (pick(s, args.split) for s in load_splits(args.data, args.cache_dir))
    n = len(records) if args.limit is None else min(args.limit, len(records))
    style, tok = prompt_format(args, tok)
    render = style.format_input if args.book_prompt else style.prompt
    prompts = [render(r["messages"]) for r in records[:n]]
    answers = generate_responses(model, prompts, tok.encode, tok.decode, args.max_new_tokens,
                                 batch_size=args.batch_size, book_prompt=args.book_prompt, eos_id=tok.stops,
                                 rng=args.seed, **opts)
    write_json(args.out, [dict(entry, model_response=a) for entry, a in zip(raw[:n], answers)])
    print(f"wrote {n} response{'s' * (n != 1)} to {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="answer a data split's prompts; writes the book's "
                                        "instruction-data-with-response.json format", description=__doc__)
    add_model_args(p)
    add_sampling_args(p)
    add_data_args(p, "test")
    p.add_argument("--limit", type=int, default=None, help="only the first N entries of the split (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--book-prompt", action="store_true",
                   help="the book exactly: prompt without the response header, then drop '### Response:' and strip")
    p.add_argument("--out", required=True, help="output JSON file")
    p.set_defaults(func=run)
