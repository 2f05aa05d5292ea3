"""Download files by URL, resumably, into a local cache (or take a local path as it is).

    fetch(url_or_path, cache_dir=None, sha256=None) -> Path   data: <cache>/<sha256(url)[:16]>/<name>
    download_file(url, dest, sha256=None, expected_size=None) -> Path   any URL to a chosen path

The cache root is the argument (`--cache-dir`), else $MINISFT_CACHE_DIR, else ~/.cache/minisft;
fetch names a URL's file by a hash of the URL, so two URLs never share a file while the name (and
its suffix) stays readable; pretrained weights live under <cache>/models/<preset>/.

The bytes go to <name>.part, renamed only once complete (every byte the server announced, and the
expected size and sha256 when given): the cache never holds a partial or corrupted file. A download
that breaks off (timeouts, connection errors, HTTP 5xx/429, short bodies) is retried and resumed from
the bytes already in the .part with an HTTP Range request; a server that ignores the range, or
answers 416 or another range, makes us start over. Retries stop only after attempts in a row that
bring no new bytes, and then the .part is kept for the next run to resume.
"""
import hashlib
import os
import re
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import requests

from .errors import MinisftError
from .progress import progress as progress_bar

CACHE_ENV = "MINISFT_CACHE_DIR"
CHUNK = 1 << 20  # bytes per read


class _Retry(Exception):
    """A failure that another attempt may get past."""


class HTTPStatusError(MinisftError):
    """The server answered with a status that is no file (404, 401, ...): status says which, so a
    caller can explain it (a gated repository)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def cache_root(cache_dir=None) -> Path:
    """The cache folder: the argument, else $MINISFT_CACHE_DIR, else ~/.cache/minisft."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/minisft").expanduser()


def is_url(source) -> bool:
    return urlparse(str(source)).scheme in ("http", "https")


def cache_path(url: str, cache_dir=None) -> Path:
    name = unquote(urlparse(url).path.rsplit("/", 1)[-1]) or "download"
    return cache_root(cache_dir) / hashlib.sha256(url.encode()).hexdigest()[:16] / name


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def fetch(source, cache_dir=None, sha256=None, **options) -> Path:
    """A local path (returned as is, after the optional sha256 check) or a URL (downloaded into the
    cache unless already there) -> the path of the file. options: download_file's."""
    if is_url(source):
        return download_file(source, cache_path(source, cache_dir), sha256, **options)
    path = Path(source).expanduser()
    if path.is_dir():
        raise MinisftError(f"{path}: is a folder, not a file; give the file in it")
    if not path.is_file():
        raise MinisftError(f"{path}: no such file")
    if sha256 and (got := file_sha256(path)) != sha256.lower():
        raise MinisftError(f"{path}: sha256 is {got}, expected {sha256.lower()}")
    return path


def download_file(url: str, dest, sha256: str | None = None, expected_size: int | None = None,
                  retries: int = 3, timeout: float = 60.0, backoff: float = 1.0, progress: bool = True,
                  headers: dict | None = None) -> Path:
    """url -> dest, downloaded unless dest is there already (and matches sha256, when given).
    headers: sent with every request (an Authorization token); requests drops Authorization when a
    redirect leaves the host, so a token never reaches the storage a hub redirects to.
    Gives up after retries + 1 attempts in a row that add no bytes (waiting backoff, 2 * backoff, ...
    between them), keeping the .part for the next run."""
    dest, sha256 = Path(dest), sha256 and sha256.lower()
    if dest.is_file():
        if not sha256 or file_sha256(dest) == sha256:
            return dest
        print(f"minisft: cached {dest} does not match its sha256; downloading it again", file=sys.stderr)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    stalled = 0
    while True:
        have = _size(part)
        try:
            _fetch_into(url, part, timeout, progress, headers or {})
            break
        except _Retry as e:
            error = str(e)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            error = f"{type(e).__name__}: {e}"
        except requests.RequestException as e:  # a bad URL, a redirect loop: no use trying again
            raise MinisftError(f"{url}: {e}") from None
        stalled = 0 if _size(part) > have else stalled + 1
        if stalled > retries:
            kept = _size(part)
            if not kept:
                part.unlink(missing_ok=True)  # an empty .part would only clutter the cache
            attempts = f"{stalled} attempt" + "s" * (stalled > 1)
            raise MinisftError(f"{url}: download failed (no new bytes; failed after {attempts}: {error})"
                               + (f"; {kept} bytes are kept in {part} and the next run resumes from there"
                                  if kept else ""))
        print(f"minisft: {url}: {error}; retrying", file=sys.stderr)
        if stalled:  # back off only while no bytes arrive
            time.sleep(backoff * 2 ** (stalled - 1))
    if expected_size is not None and (size := _size(part)) != expected_size:
        part.unlink()
        raise MinisftError(f"{url}: downloaded {size} bytes, expected {expected_size}; the file was discarded")
    if sha256 and (got := file_sha256(part)) != sha256:
        part.unlink()
        raise MinisftError(f"{url}: sha256 is {got}, expected {sha256}; the file was discarded")
    os.replace(part, dest)
    return dest


def _fetch_into(url, part: Path, timeout, progress, extra: dict) -> None:
    """One request appending to part from its current size on; raises _Retry when it ends short."""
    have = _size(part)
    # identity (no gzip): sizes and ranges then count the bytes as they land on disk
    headers = {**extra, "Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code >= 500 or r.status_code == 429:  # the server's trouble, which may pass
            raise _Retry(f"HTTP {r.status_code} {r.reason}")
        m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", r.headers.get("Content-Range", ""))
        if r.status_code == 206 and m and int(m[1]) == have:  # the rest, from where we stopped
            mode, total = "ab", None if m[2] == "*" else int(m[2])
        elif r.status_code == 200:  # the whole file, also from a server that ignores Range
            mode, have = "wb", 0
            total = int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None
        elif have and r.status_code in (206, 416):
            # The .part is no prefix of the server's file (416: it is longer; 206: the server
            # resumes elsewhere): drop it and ask for the whole file.
            part.unlink()
            return _fetch_into(url, part, timeout, progress, extra)
        else:
            raise HTTPStatusError(f"{url}: HTTP {r.status_code} {r.reason}", r.status_code)
        # A connection that drops early then ends the body instead of raising: urllib3 would
        # discard the bytes of the chunk in flight, which we keep and count against `total`.
        r.raw.enforce_content_length = False
        with open(part, mode) as f, progress_bar(total, part.name.removesuffix(".part"), "B", initial=have,
                                                 enabled=progress, unit_scale=True) as bar:
            for chunk in r.iter_content(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    size = _size(part)
    if total is not None and size > total:
        part.unlink()
        raise MinisftError(f"{url}: received {size} bytes, more than the {total} announced; discarded")
    if total is not None and size < total:
        raise _Retry(f"the connection closed after byte {size} of {total}")
