"""`minisft finetune`: instruction fine-tuning, the book's chapter-7 recipe by default (settings in
minisft.settings, the loop in minisft.train)."""
from ..rundir import saved_settings
from ..settings import Settings, add_arguments, given, resolve
from ..train import dry_run, finetune


def run(args) -> int:
    # A resume starts from the run's saved settings: only what is given here differs (and is
    # checked against the checkpoint by minisft.rundir).
    mine = given(args)
    base = saved_settings(mine.get("out", Settings.out)) if mine.get("resume") else None
    if args.dry_run:
        dry_run(resolve(args, base))
        return 0
    finetune(resolve(args, base))
    return 0


def register(sub) -> None:
    p = sub.add_parser("finetune", help="instruction fine-tuning (the book's chapter 7 recipe by default)",
                       description=__doc__)
    add_arguments(p)
    p.add_argument("--dry-run", action="store_true",
                   help="print the estimated memory per part and whether it fits, then stop (no model, no run)")
    p.set_defaults(func=run)
