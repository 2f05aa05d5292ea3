"""`minisft` on the command line: one module per subcommand, each only parsing its arguments and
calling library code.

Every module in COMMANDS exposes `register(subparsers)`, which adds its parser and sets `func`
(called with the parsed args; returns an exit code or None). A MinisftError anywhere becomes a
one-line message on stderr and exit status 2, never a traceback; so do, with exit status 1, the
failures of the machine rather than of the input (a full disk, a folder without write permission,
memory running out), here and only here.
"""
import argparse
import errno
import functools
import importlib
import os
import signal
import sys

from .. import __version__
from ..errors import MinisftError

# The subcommands, in the order `minisft --help` lists them; each is minisft/cli/<name>.py.
COMMANDS = ["finetune", "generate", "chat", "serve", "eval", "judge", "export", "data", "bench", "study"]


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already says it or there is none."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default is None or action.default is False \
                or action.default == []:
            return action.help
        return super()._get_help_string(action)


class RawDefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultsHelpFormatter):
    """DefaultsHelpFormatter, with the description's lines kept as written (a table, say)."""


# The parser of every subcommand, at any depth: every option shows its default.
SUBPARSER = functools.partial(argparse.ArgumentParser, formatter_class=DefaultsHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minisft", description="Instruction fine-tuning of GPT-2-class models "
                                     "with a hand-written engine (numpy, numba, torch backends).")
    parser.add_argument("--version", action="version", version=f"minisft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=SUBPARSER)
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"minisft.cli.{name}").register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, so that a reader that left (`| head`) is met by the handler below
    except BrokenPipeError:
        return quiet_broken_pipe()
    except MinisftError as e:
        print(f"minisft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minisft: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("minisft: error: out of memory; use a smaller model, --batch-size or --max-length, or free memory",
              file=sys.stderr)
        return 1
    except OSError as e:
        print(f"minisft: error: {os_error(e)}", file=sys.stderr)
        return 1
    return int(code or 0)


def quiet_broken_pipe() -> int:
    """The reader of stdout has gone (`minisft study softmax | head`): end without a word, as git
    does, with the status of a process killed by SIGPIPE. stdout goes to /dev/null first, so the
    interpreter's own flush at exit finds nowhere to fail (Python's documented recipe)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 128 + signal.SIGPIPE


# What to do about the errors of the machine, by errno.
ADVICE = {errno.ENOSPC: "the disk is full: free space or write elsewhere",
          errno.EDQUOT: "the disk quota is used up: free space or write elsewhere",
          errno.EACCES: "no permission: fix the permissions or choose another path",
          errno.EPERM: "not permitted: fix the permissions or choose another path",
          errno.EROFS: "the file system is read-only: choose another path",
          errno.EISDIR: "that is a folder: give a file path",
          errno.ENOTDIR: "a part of that path is a file, not a folder"}


def os_error(e: OSError) -> str:
    """One line: the path, what failed, what to do."""
    what = e.strerror or str(e)
    advice = ADVICE.get(e.errno)
    line = what + (f"; {advice}" if advice else "")
    if e.filename is None:  # a network error (requests' are OSErrors) or one without a path
        return line
    return f"{e.filename}{f' -> {e.filename2}' if e.filename2 is not None else ''}: {line}"
