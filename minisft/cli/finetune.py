"""`minisft finetune`: instruction fine-tuning, the book's chapter-7 recipe by default (settings in
minisft.settings, the loop in minisft.train)."""
from ..settings import add_arguments, resolve
from ..train import finetune


def run(args) -> int:
    finetune(resolve(args))
    return 0


def register(sub) -> None:
    p = sub.add_parser("finetune", help="instruction fine-tuning (the book's chapter 7 recipe by default)",
                       description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run)
