"""`minisft data stats FILE` and `minisft data inspect FILE --index I` (with --chat-template and
--weights DIR: a model's template and tokenizer; the trained tokens marked): look at a dataset before
training on it. `minisft data clean IN --out OUT` filters, decontaminates and deduplicates it;
`minisft data convert IN --to FORMAT --out OUT` changes its record format. Every one reads its data
as `finetune --data` does: a local path or a URL (downloaded into the cache), by default the book's
instruction-data.json (its URL, read from the copy bundled with minisft)."""
import sys

from .. import curate
from ..chat_template import ChatTemplate
from ..config import PRESETS, GPTConfig
from ..data import DEFAULT_DATA_URL, FORMATS, LAYOUTS, convert_file, encode_record, load_records
from ..datastats import data_stats, histogram
from ..errors import MinisftError
from ..prompts import MASKS, STYLES, get_style
from ..tokenizer import GPT2, HFTokenizer
from . import SUBPARSER, RawDefaultsHelpFormatter
from .checks import at_least
from .model_args import add_prompt_args, mask_of, prompt_format


def stats(args) -> int:
    at_least(args, "max_length", 1)
    records = load_records(args.file, args.cache_dir, args.sha256)
    style = get_style(args.prompt_style)
    context = GPTConfig.preset(args.model).context_length
    limit = min(args.max_length, context)
    s = data_stats(records, style, limit, args.shuffle_seed)
    print(f"{args.file}: {s.records} records ({s.single_turn} single-turn, {s.multi_turn} multi-turn; "
          f"{s.with_system} with a system message; {s.alpaca_inputs} Alpaca inputs)")
    print(f"split ({'file order' if args.shuffle_seed is None else f'shuffled, seed {args.shuffle_seed}'}): "
          f"train {s.split['train']}, val {s.split['val']}, test {s.split['test']}")
    t = s.tokens
    print(f"tokens per record ({style.name} style, GPT-2, before the appended end-of-text): min {t['min']}, "
          f"median {t['median']}, mean {t['mean']:.1f}, max {t['max']}")
    print("\n".join(histogram(s.lengths)))
    print(f"longer than {limit} tokens ({args.model}'s context {context}, --max-length {args.max_length}; "
          f"truncated in training): {s.longer}")
    print(f"exact duplicates (same rendered text as an earlier record): {s.duplicates}")
    for name in ("val", "test"):
        print(f"{name} records whose prompt (case and whitespace normalised) is also in train: {s.in_train[name]}")
    print(f"records containing a literal '<|endoftext|>' (tokenized as plain text): {s.literal_eot}")
    return 0


def inspect(args) -> int:
    records = load_records(args.file, args.cache_dir, args.sha256)
    if not 0 <= args.index < len(records):
        raise MinisftError(f"{args.file}: --index {args.index} is out of range: the file has {len(records)} "
                           f"records (0 to {len(records) - 1})")
    tok = HFTokenizer(args.weights) if args.weights else GPT2
    style, tok = prompt_format(args, tok)
    mask = mask_of(args, style)
    messages = records[args.index]["messages"]
    ex = encode_record(records[args.index], style, mask, tok)
    kind = "chat template" if isinstance(style, ChatTemplate) else "style"
    print(f"== record {args.index} of {len(records)}: {style.name} {kind}, mask={mask} ==")
    print("-- training text --")
    print(style.training_text(messages))
    print("-- trained tokens marked (" + ("in colour" if sys.stdout.isatty() else "[[between double brackets]]")
          + ") --")
    print(marked_text(ex, tok, sys.stdout.isatty()))
    print("-- inference prompt (ends with the response header) --")
    print(style.prompt(messages), end="")
    print("-- tokens: 'train' = the loss is taken on predicting this token, 'mask' = not --")
    for i, (token, trained) in enumerate(zip(ex.tokens, ex.trained)):
        label = "-" if i == 0 else ("train" if trained else "mask")  # nothing predicts the first token
        text = tok.token_bytes(token).decode("utf-8", errors="backslashreplace")
        print(f"{i:6d} {token:6d}  {label:5s}  {text!r}")
    eos = tok.token_bytes(tok.eos).decode("utf-8", errors="backslashreplace")
    print(f"{len(ex.tokens):6d} {tok.eos:6d}  train  {eos!r} (appended end-of-text)")
    print(f"{int(ex.trained[1:].sum()) + 1} of {len(ex.tokens)} targets trained")
    return 0


def marked_text(ex, tok, colour: bool) -> str:
    """The example's text with each run of trained tokens in green (colour) or between [[ and ]]."""
    opening, closing = ("\x1b[32m", "\x1b[0m") if colour else ("[[", "]]")
    out, inside = [], False
    for token, trained in zip(ex.tokens, ex.trained):
        if trained != inside:
            out.append(opening if trained else closing)
            inside = bool(trained)
        out.append(tok.token_bytes(token))
    joined = b"".join(o if isinstance(o, bytes) else o.encode() for o in out)  # a character may span tokens
    return joined.decode("utf-8", errors="backslashreplace") + (closing if inside else "")


def clean(args) -> int:
    settings = curate.CleanSettings(
        skip=frozenset(args.skip), prompt_style=args.prompt_style, max_length=args.max_length,
        too_long=args.too_long, min_response_tokens=args.min_response_tokens,
        max_response_tokens=args.max_response_tokens, min_alpha=args.min_alpha,
        phrases=curate.read_phrases(args.phrases) if args.phrases else curate.DEFAULT_PHRASES,
        threshold=args.threshold, shingle=args.shingle, num_perm=args.num_perm, ngram=args.ngram,
        against=tuple(args.against), against_own_split=args.against_own_split, seed=args.seed)
    report = curate.clean(args.file, args.out, settings, args.report, args.cache_dir, args.sha256)
    print("\n".join(curate.summary(report)))
    return 0


def convert(args) -> int:
    n = convert_file(args.file, args.to, args.out, args.layout, args.cache_dir, args.sha256)
    print(f"{args.file}: {n} records written as {args.to} to {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("data", help="inspect, clean and convert an instruction dataset", description=__doc__)
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=SUBPARSER)
    dsub.required = True
    for add in (add_stats, add_inspect, add_clean, add_convert):
        add(dsub)


def add_source(q, metavar="FILE") -> None:  # every data command reads its data as `finetune --data` does
    q.add_argument("file", nargs="?", default=DEFAULT_DATA_URL, metavar=metavar,
                   help="a JSON/JSONL file or URL, downloaded into the cache (default: the book's "
                        "instruction-data.json, read from the copy bundled with minisft)")
    q.add_argument("--cache-dir", default=None, help="download cache (default $MINISFT_CACHE_DIR or "
                   "~/.cache/minisft)")
    q.add_argument("--sha256", default=None, help="expected sha256 of the file")


def add_stats_source(q) -> None:  # what stats reads
    add_source(q)
    q.add_argument("--prompt-style", default="alpaca", choices=list(STYLES), help="prompt style")


def add_stats(dsub) -> None:
    q = dsub.add_parser("stats", help="counts, token lengths, duplicates, train/test overlap", description=(
        "A dataset before training on it: records and turns, the book's 85/10/5 split, a histogram of tokens "
        "per record, records longer than the model's context or --max-length, exact duplicates, and val and "
        "test records whose prompt is also in train."))
    add_stats_source(q)
    q.add_argument("--max-length", type=int, default=1024, help="report records longer than this (clamped to "
                   "the model's context)")
    q.add_argument("--model", default="gpt2-medium", choices=list(PRESETS), help="the model whose context counts")
    q.add_argument("--shuffle-seed", type=int, default=None, help="shuffle before the split")
    q.set_defaults(func=stats)


def add_inspect(dsub) -> None:
    q = dsub.add_parser("inspect", help="one record rendered, token by token, with its loss mask", description=(
        "One record as training sees it: its training text, its inference prompt, and every token with "
        "whether the loss is taken on predicting it (--mask-prompt)."))
    add_source(q)
    add_prompt_args(q)
    q.add_argument("--weights", default=None, help="a Hugging Face model folder: its tokenizer.json (and its chat "
                                                   "template) instead of GPT-2's")
    q.add_argument("--index", type=int, required=True, help="record index (0-based)")
    q.add_argument("--mask-prompt", default=None, choices=list(MASKS),
                   help="none: train every token (the book); input: mask the prompt (exercise 7.2); "
                        "header: also mask the response header (TRL); assistant: only assistant turns "
                        "(default: none for a prompt style, assistant for a chat template)")
    q.set_defaults(func=inspect)


def add_clean(dsub) -> None:
    d = curate.CleanSettings()
    q = dsub.add_parser("clean", help="filter, decontaminate and deduplicate a data file, with a report",
                        description=curate.__doc__, formatter_class=RawDefaultsHelpFormatter)
    add_source(q, "IN")
    q.add_argument("--out", required=True, help="the cleaned file (same layout and record formats)")
    q.add_argument("--report", default=None, help="write the report as JSON here")
    q.add_argument("--skip", action="append", default=[], choices=curate.STEPS, metavar="STEP",
                   help=f"a step not to run (repeatable): {', '.join(curate.STEPS)}")
    q.add_argument("--prompt-style", default=d.prompt_style, choices=list(STYLES),
                   help="renders the training text measured by --max-length")
    q.add_argument("--max-length", type=int, default=d.max_length, help="the context length, in tokens")
    q.add_argument("--too-long", default=d.too_long, choices=curate.TOO_LONG,
                   help="a record over --max-length: dropped, or its last response truncated to fit")
    q.add_argument("--min-response-tokens", type=int, default=d.min_response_tokens,
                   help="response-length: fewest GPT-2 tokens of each response")
    q.add_argument("--max-response-tokens", type=int, default=d.max_response_tokens,
                   help="response-length: most GPT-2 tokens of each response (default: no bound)")
    q.add_argument("--min-alpha", type=float, default=d.min_alpha,
                   help="non-text: least fraction of letters among the non-space characters")
    q.add_argument("--phrases", default=None, help="boilerplate phrases, one per line (replaces the default list)")
    q.add_argument("--threshold", type=float, default=d.threshold, help="near duplicates: Jaccard similarity")
    q.add_argument("--shingle", type=int, default=d.shingle, help="near duplicates: words per shingle")
    q.add_argument("--num-perm", type=int, default=d.num_perm, help="near duplicates: MinHash permutations")
    q.add_argument("--seed", type=int, default=d.seed, help="seed of the MinHash permutations")
    q.add_argument("--ngram", type=int, default=d.ngram, help="decontamination: n-gram length in words")
    q.add_argument("--against", action="append", default=[], metavar="FILE",
                   help="evaluation data to decontaminate against, a file or URL (repeatable, any supported format)")
    q.add_argument("--against-own-split", action="store_true",
                   help="check the file's train part against its own test and val parts (minisft's 85/10/5 "
                        "file-order split) and leave those two untouched")
    q.set_defaults(func=clean)


def add_convert(dsub) -> None:
    q = dsub.add_parser("convert", help="write a data file in another record format", description=(
        "Every record of a data file in another record format (Alpaca, ShareGPT, OpenAI messages), losing "
        "nothing: keys a format does not name travel along. The layout follows --out's extension (.json a "
        "JSON list, .jsonl one record per line) unless --layout says. A record the target format cannot "
        "hold stops the conversion, naming it, before anything is written."))
    add_source(q, "IN")
    q.add_argument("--to", required=True, choices=FORMATS, help="the record format to write")
    q.add_argument("--out", required=True, help="the converted file: .json a JSON list, .jsonl one record per line")
    q.add_argument("--layout", default=None, choices=LAYOUTS,
                   help="the output's layout whatever --out's extension (default: from the extension)")
    q.set_defaults(func=convert)
