"""`minisft finetune`: instruction fine-tuning, the book's chapter-7 recipe by default (settings in
minisft.settings, the loop in minisft.train)."""
import argparse

from ..settings import add_arguments, resolve
from ..train import finetune


def run(args) -> int:
    finetune(resolve(args))
    return 0


def register(sub) -> None:
    # Plain help format: each setting's help already states its default (argparse's is None here,
    # so that only the flags given override the TOML file).
    p = sub.add_parser("finetune", help="instruction fine-tuning (the book's chapter 7 recipe by default)",
                       description=__doc__, formatter_class=argparse.HelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
