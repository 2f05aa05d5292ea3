"""`minisft` on the command line: one module per subcommand, each only parsing its arguments and
calling library code.

Every module in COMMANDS exposes `register(subparsers)`, which adds its parser and sets `func`
(called with the parsed args; returns an exit code or None). A MinisftError anywhere becomes a
one-line message on stderr and exit status 2, never a traceback.
"""
import argparse
import importlib
import sys

from .. import __version__
from ..errors import MinisftError

# The subcommands, in the order `minisft --help` lists them; each is minisft/cli/<name>.py.
COMMANDS = ["finetune", "generate", "chat", "serve", "eval", "judge", "export", "data", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minisft", description="Instruction fine-tuning of GPT-2-class models "
                                     "with a hand-written engine (numpy, numba, torch backends).")
    parser.add_argument("--version", action="version", version=f"minisft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"minisft.cli.{name}").register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except MinisftError as e:
        print(f"minisft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minisft: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)
