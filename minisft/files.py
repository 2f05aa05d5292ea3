"""Writing files so that a crash never leaves one half-written: write beside it, then rename."""
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path):
    """Yield a temporary path in path's folder; when the block succeeds it is renamed over path
    (atomic on POSIX), when it fails it is removed and path is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_writable(path, what="output") -> None:
    """Refuse, before any work, an output path whose folder does not exist or that is a folder."""
    from .errors import MinisftError

    path = Path(path)
    if path.is_dir():
        raise MinisftError(f"{path}: the {what} is a folder, not a file path")
    if not path.parent.is_dir():
        raise MinisftError(f"{path}: the {what}'s folder {path.parent} does not exist")


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path, obj, indent=4) -> None:
    """JSON as the book writes its files (json.dump with indent=4)."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")
