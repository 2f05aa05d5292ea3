"""Checks every command makes on its flags before its work: numbers in range, outputs writable (so
hours of generation are never lost to an --out that cannot be written)."""
import os
from pathlib import Path

from ..errors import MinisftError


def at_least(args, name: str, low: int) -> None:
    value = getattr(args, name)
    if value is not None and value < low:
        raise MinisftError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")


def output_file(path, flag="--out") -> Path:
    """An output file we can write: checked before the work that fills it."""
    path = Path(path)
    if path.is_dir():
        raise MinisftError(f"{flag} {path}: is a folder; give a file path")
    if not path.parent.is_dir():
        raise MinisftError(f"{flag} {path}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise MinisftError(f"{flag} {path}: the folder {path.parent} is not writable")
    return path


def output_dir(path, flag) -> Path:
    """An output folder we can create or write into: checked before the work that fills it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MinisftError(f"{flag} {path}: is a file, not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise MinisftError(f"{flag} {path}: {existing} is not a writable folder")
    return path
