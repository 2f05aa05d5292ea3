"""`minisft finetune`: instruction fine-tuning, the book's chapter-7 recipe by default (settings in
minisft.settings, the loop in minisft.train)."""
import argparse

from ..settings import add_arguments, resolve
from ..train import finetune, plan_run


def run(args) -> int:
    if args.dry_run:
        plan_run(resolve(args))
        return 0
    finetune(resolve(args))
    return 0


def register(sub) -> None:
    # Plain help format: each setting's help already states its default (argparse's is None here,
    # so that only the flags given override the TOML file).
    p = sub.add_parser("finetune", help="instruction fine-tuning (the book's chapter 7 recipe by default)",
                       description=__doc__, formatter_class=argparse.HelpFormatter)
    add_arguments(p)
    p.add_argument("--dry-run", action="store_true",
                   help="print the estimated memory per part and whether it fits, then stop (no model, no run)")
    p.set_defaults(func=run)
