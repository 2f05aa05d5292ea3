"""Checks every command makes on its flags before its work: numbers in range, outputs writable (so
hours of generation are never lost to an --out that cannot be written)."""
import os
from pathlib import Path

from ..errors import MinisftError
from ..files import output_file  # noqa: F401  (the commands check their output files through here)


def at_least(args, name: str, low: int) -> None:
    value = getattr(args, name)
    if value is not None and value < low:
        raise MinisftError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")


def output_dir(path, flag) -> Path:
    """An output folder we can create or write into: checked before the work that fills it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MinisftError(f"{flag} {path}: is a file, not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise MinisftError(f"{flag} {path}: {existing} is not a writable folder")
    return path
