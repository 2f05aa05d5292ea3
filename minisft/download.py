"""Fetch a file by URL into a local cache (or take a local path as it is).

    fetch(url_or_path, cache_dir=None, sha256=None) -> Path

A URL (http/https) is downloaded once into the cache dir (`--cache-dir`, else $MINISFT_CACHE_DIR,
else ~/.cache/minisft) as <cache>/<first 16 hex of sha256(url)>/<file name>, so two URLs never
share a file while the name (and its suffix) stays readable. The bytes go to <name>.part, which is
renamed only once the download is complete and, if a sha256 was given, matches it: the cache never
holds a partial or corrupted file. A download that breaks off is retried (timeouts, connection
errors, HTTP 5xx/429, short bodies) and resumed from the bytes already in the .part file with an
HTTP Range request; a server that ignores the range is read from the start again. A sha256
mismatch deletes the .part file and fails.
"""
import hashlib
import os
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import requests
from tqdm import tqdm

from .errors import MinisftError

CACHE_ENV = "MINISFT_CACHE_DIR"
CHUNK = 1 << 16  # bytes per read; a read that breaks off loses at most this much


class _Retry(Exception):
    """A failure worth another attempt."""


def default_cache_dir(cache_dir=None) -> Path:
    """The cache dir: the argument, else $MINISFT_CACHE_DIR, else ~/.cache/minisft."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/minisft").expanduser()


def is_url(source) -> bool:
    return urlparse(str(source)).scheme in ("http", "https")


def cache_path(url: str, cache_dir=None) -> Path:
    name = unquote(urlparse(url).path.rsplit("/", 1)[-1]) or "download"
    return default_cache_dir(cache_dir) / hashlib.sha256(url.encode()).hexdigest()[:16] / name


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fetch(source, cache_dir=None, sha256=None, timeout=30.0, retries=3, backoff=1.0, progress=True) -> Path:
    """A local path (returned as is, after the optional sha256 check) or a URL (downloaded into the
    cache unless already there) -> the path of the file."""
    sha256 = sha256.lower() if sha256 else None
    if not is_url(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise MinisftError(f"{path}: no such file")
        if sha256 and (got := file_sha256(path)) != sha256:
            raise MinisftError(f"{path}: sha256 is {got}, expected {sha256}")
        return path

    dest = cache_path(source, cache_dir)
    if dest.is_file():
        if not sha256 or file_sha256(dest) == sha256:
            return dest
        print(f"minisft: cached {dest} does not match its sha256; downloading it again", file=sys.stderr)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _download(source, part, timeout, progress)
            break
        except _Retry as e:
            if attempt == retries:
                raise MinisftError(f"downloading {source} failed after {retries + 1} attempts: {e}") from None
            print(f"minisft: {e}; retrying ({attempt + 1}/{retries})", file=sys.stderr)
            time.sleep(backoff * 2 ** attempt)
    if sha256 and (got := file_sha256(part)) != sha256:
        part.unlink()
        raise MinisftError(f"downloaded {source}: sha256 is {got}, expected {sha256}; the file was discarded")
    os.replace(part, dest)
    return dest


def _download(url, part: Path, timeout, progress) -> None:
    """One attempt: fetch url into part, resuming from part's current size when it has one."""
    have = part.stat().st_size if part.exists() else 0
    # identity: the bytes on disk are the bytes sent, so Content-Length and Range count the same bytes
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
    try:
        with requests.get(url, stream=True, timeout=timeout, headers=headers) as r:
            if r.status_code == 416:  # the range lies past the end: the .part is stale, start over
                part.unlink()
                raise _Retry("the server refused to resume (HTTP 416)")
            if r.status_code >= 500 or r.status_code == 429:
                raise _Retry(f"HTTP {r.status_code} {r.reason}")
            if r.status_code >= 400:
                raise MinisftError(f"downloading {url} failed: HTTP {r.status_code} {r.reason}")
            resumed = r.status_code == 206  # else 200: the whole file (a server may ignore the Range)
            if resumed and not (have and r.headers.get("Content-Range", "").startswith(f"bytes {have}-")):
                part.unlink(missing_ok=True)
                raise _Retry(f"the server sent a different range ({r.headers.get('Content-Range')}) than asked")
            start = have if resumed else 0
            length = r.headers.get("Content-Length")
            total = start + int(length) if length is not None else None
            with open(part, "ab" if resumed else "wb") as f, \
                    tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=part.name[:-5],
                         disable=not progress) as bar:
                for chunk in r.iter_content(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
    except requests.RequestException as e:  # timeouts, refused or dropped connections
        raise _Retry(f"{type(e).__name__}: {e}") from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Retry(f"the connection closed after {size} of {total} bytes")
