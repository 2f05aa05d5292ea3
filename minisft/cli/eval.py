"""`minisft eval`: token-weighted loss and perplexity of a trained model on a whole data split
(training's val loss is an estimate on --eval-iter batches; this is every batch)."""
import json
from functools import partial

from tqdm import tqdm

from ..data import Loader, collate_examples, encode_records, load_splits
from ..errors import MinisftError
from ..evaluate import NoTargets, evaluate_loss
from ..prompts import MASKS
from .checks import at_least
from .model_args import add_data_args, add_model_args, load_model, mask_of, model_tokenizer, pick, prompt_format


def run(args) -> int:
    at_least(args, "max_length", 1)
    at_least(args, "batch_size", 1)
    model = load_model(args)
    style, tok = prompt_format(args, model_tokenizer(args, model))
    mask = mask_of(args, style)
    records = pick(load_splits(args.data, args.cache_dir)[1], args.split)
    max_len = min(args.max_length, model.cfg.context_length)
    examples = encode_records(records, style, mask, tok)
    loader = Loader(examples, args.batch_size, shuffle=False, drop_last=False,
                    collate=partial(collate_examples, packed=True, allowed_max_length=max_len, eos=tok.eos))
    try:
        loss, ppl, n = evaluate_loss(model, tqdm(loader, desc="eval", unit="batch", disable=None, leave=False))
    except NoTargets:
        raise MinisftError(f"--max-length {args.max_length} with --mask-prompt {mask} leaves no "
                           f"target to score in the {args.split} split") from None
    model_name = f"{'checkpoint' if args.checkpoint else 'weights'} {args.checkpoint or args.weights}" + (
        f" + adapter {args.adapter}" if args.adapter else "")
    if args.json:
        print(json.dumps({"model": model_name, "split": args.split, "records": len(records), "targets": n,
                          "loss": loss, "perplexity": ppl}))
    else:
        print(f"{model_name}, {args.split} split ({len(records)} records, {n} targets): loss {loss:.4f}, "
              f"perplexity {ppl:.2f}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="token-weighted loss and perplexity on a whole data split", description=__doc__)
    add_model_args(p)
    add_data_args(p, "val")
    p.add_argument("--mask-prompt", default=None, choices=MASKS,
                   help="which prompt tokens get no loss (default: none for a prompt style, assistant for a chat "
                        "template)")
    p.add_argument("--max-length", type=int, default=1024, help="truncate sequences (clamped to the context)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object (model, split, records, "
                   "targets, loss, perplexity) instead of a sentence")
    p.set_defaults(func=run)
