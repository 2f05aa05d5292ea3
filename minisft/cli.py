"""`minisft` on the command line: one subcommand per job, each registered by the module that owns it.

Every subcommand module exposes `register(subparsers)`, which adds its parser and sets `func`
(called with the parsed args; returns an exit code or None). A MinisftError anywhere becomes a
one-line message on stderr and exit status 2, never a traceback.
"""
import argparse
import importlib
import sys

from .errors import MinisftError


# Modules under minisft/ that each add one subcommand.
COMMAND_MODULES = ["bench", "data_cmd", "export_cmd", "finetune_cmd", "infer_cmd", "judge"]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="minisft", description="Instruction fine-tuning of GPT-2-class models.")
    parser.add_argument("--version", action="version", version=f"minisft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"minisft.{name}").register(sub)
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
