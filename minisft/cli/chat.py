"""`minisft chat`: talk to a trained model in its prompt style or chat template (with its generation
prompt; a reply ends at the template's end-of-turn token), tokens streamed as they are generated.
The conversation so far is the prompt (the style's multi-turn form); when it outgrows the context
its oldest exchanges are dropped, and chat says so. /help lists the commands, /reset starts a new
conversation, /quit (or end of input) ends it."""
from ..generate import chat_loop
from .model_args import (add_model_args, add_sampling_args, check_top_k, load_model, model_tokenizer, prompt_format,
                         sampling)


def run(args) -> int:
    opts = sampling(args)
    model = load_model(args)
    style, tok = prompt_format(args, model_tokenizer(args, model))
    check_top_k(args, model)
    print(f"chatting in the {style.name} style; /help for the commands, /quit or end of input to stop")
    chat_loop(model, style, tok.encode, tok.decode, max_new_tokens=args.max_new_tokens, eos_id=tok.stops,
              rng=args.seed, **opts)
    return 0


def register(sub) -> None:
    p = sub.add_parser("chat", help="a multi-turn conversation with a model, tokens streamed as generated",
                       description=__doc__)
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=run)
