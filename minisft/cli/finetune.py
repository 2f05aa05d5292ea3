"""`minisft finetune`: instruction fine-tuning, the book's chapter-7 recipe by default (settings in
minisft.settings, the loop in minisft.train)."""
from ..rundir import saved_settings
from ..settings import Settings, add_arguments, given, resolve
from ..train import finetune


def run(args) -> int:
    # A resume starts from the run's saved settings: only what is given here differs (and is
    # checked against the checkpoint by minisft.rundir).
    mine = given(args)
    base = saved_settings(mine.get("out", Settings.out)) if mine.get("resume") else None
    finetune(resolve(args, base))
    return 0


def register(sub) -> None:
    p = sub.add_parser("finetune", help="instruction fine-tuning (the book's chapter 7 recipe by default)",
                       description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run)
