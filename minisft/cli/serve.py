"""`minisft serve`: an OpenAI-compatible HTTP endpoint (/v1/chat/completions, /v1/completions,
/v1/models) and a chat page at / for a model, concurrent requests decoded together."""
import logging
import os
import sys
from pathlib import Path

from ..errors import MinisftError
from ..serve import MAX_TEMPERATURE, Server, is_loopback, kv_cache_bytes
from .model_args import (add_model_args, add_sampling_args, check_top_k, load_model, model_tokenizer, prompt_format,
                         sampling)


def run(args) -> int:
    opts = sampling(args)
    if not 0 <= args.port <= 65535:
        raise MinisftError(f"--port must lie in [0, 65535], got {args.port}")
    if args.max_batch < 1:
        raise MinisftError(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.api_key == "":
        raise MinisftError("--api-key is empty")
    # The defaults stand in for what a request leaves out, so they are held to a request's bounds:
    # a default out of them would start a server that refuses every request.
    if opts["temperature"] > MAX_TEMPERATURE:
        raise MinisftError(f"--temperature must be at most {MAX_TEMPERATURE} (the API's bound), got {args.temperature}")
    model = load_model(args)
    check_top_k(args, model)  # before listening: a default past the vocabulary would refuse every request
    # the prompt style or chat template (with its tokenizer, which reads the template's control tokens)
    style, tok = prompt_format(args, model_tokenizer(args, model))
    name = args.name or Path(args.checkpoint or args.weights).name
    try:
        server = Server(model, style, tok=tok, host=args.host, port=args.port, model_name=name, api_key=args.api_key,
                        max_batch=args.max_batch, defaults=dict(opts, max_tokens=args.max_new_tokens),
                        seed=args.seed)
    except OSError as e:
        raise MinisftError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    if not is_loopback(args.host) and args.api_key is None:
        print(f"minisft serve: warning: listening on {args.host} without --api-key: anyone who can reach "
              "this port can use the model", file=sys.stderr)
    print(f"serving {name!r} ({style.name} prompts) at {server.url}/v1 and the chat page at {server.url}/ "
          f"(up to {args.max_batch} streams, KV cache up to "
          f"{kv_cache_bytes(model, args.max_batch) / 2**20:.0f} MiB); Ctrl-C stops", flush=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server and a chat page for a model",
                       description=__doc__)
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    p.add_argument("--api-key", default=os.environ.get("MINISFT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every /v1 request (default: $MINISFT_API_KEY; the "
                        "variable keeps the key out of the process list)")
    p.add_argument("--name", default=None, help="the model name clients send (default: the checkpoint's file name)")
    p.add_argument("--max-batch", type=int, default=16, help="most requests decoded together")
    p.set_defaults(func=run)
