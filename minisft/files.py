"""Writing files so that a crash never leaves one half-written: write beside it, then rename."""
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import MinisftError


@contextmanager
def atomic_path(path):
    """Yield a temporary path in path's folder; when the block succeeds it is renamed over path
    (atomic on POSIX), when it fails it is removed and path is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes it 0600; a file we write gets the usual mode
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_file(path, flag="--out") -> Path:
    """An output file we can write: checked before the work that fills it (so hours of work are never
    lost to an output that cannot be written)."""
    path = Path(path)
    if path.is_dir():
        raise MinisftError(f"{flag} {path}: is a folder; give a file path")
    if not path.parent.is_dir():
        raise MinisftError(f"{flag} {path}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise MinisftError(f"{flag} {path}: the folder {path.parent} is not writable")
    return path


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path, obj, indent=4) -> None:
    """JSON as the book writes its files (json.dump with indent=4)."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")
