"""minisft.download.fetch against a real HTTP server on 127.0.0.1 serving a file from the test."""
import hashlib
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

import minisft.data
import minisft.download
from minisft.data import DEFAULT_DATA_SHA256, load_records
from minisft.download import cache_path, fetch
from minisft.errors import MinisftError
from tests.file_server import FileServer


@pytest.fixture(scope="module")
def body(book_data):
    return book_data.read_bytes()


@pytest.fixture
def serve(body, tmp_path_factory, monkeypatch):
    """start(script) -> a server (tests/file_server.py, answering as `script` says) seen as
    .url, the URL of the book's file on it, and .requests, every GET it got."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    servers = []

    def start(script=()):
        root = tmp_path_factory.mktemp("srv")
        (root / "files").mkdir()
        (root / "files" / "instruction-data.json").write_bytes(body)
        servers.append(FileServer(root))
        servers[-1].script = list(script)
        return SimpleNamespace(url=f"{servers[-1].url}/files/instruction-data.json", requests=servers[-1].requests)

    yield start
    for s in servers:
        s.close()


def files_in(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def test_download_into_the_cache_and_reuse_it(serve, body, tmp_path):
    server = serve()
    sha = hashlib.sha256(body).hexdigest()
    path = fetch(server.url, cache_dir=tmp_path, sha256=sha, progress=False)
    assert path == cache_path(server.url, tmp_path) and path.parent.parent == tmp_path
    assert path.name == "instruction-data.json" and path.read_bytes() == body
    assert files_in(tmp_path) == ["instruction-data.json"]  # no temp file left behind
    assert fetch(server.url, cache_dir=tmp_path, sha256=sha, progress=False) == path
    assert fetch(server.url, cache_dir=tmp_path, progress=False) == path
    assert len(server.requests) == 1  # the cached copy was used
    assert server.requests[0].get("Accept-Encoding") == "identity"


def test_cache_dir_from_the_environment(serve, body, tmp_path, monkeypatch):
    server = serve()
    monkeypatch.setenv("MINISFT_CACHE_DIR", str(tmp_path / "env-cache"))
    path = fetch(server.url, progress=False)
    assert path.is_relative_to(tmp_path / "env-cache") and path.read_bytes() == body
    # an explicit cache dir wins over the environment
    assert fetch(server.url, cache_dir=tmp_path / "flag", progress=False).is_relative_to(tmp_path / "flag")


def test_corrupted_download_is_rejected_and_not_cached(serve, body, tmp_path):
    server = serve(["corrupt"])
    sha = hashlib.sha256(body).hexdigest()
    with pytest.raises(MinisftError, match=f"sha256 is [0-9a-f]{{64}}, expected {sha}; the file was discarded"):
        fetch(server.url, cache_dir=tmp_path, sha256=sha, progress=False, backoff=0)
    assert files_in(tmp_path) == []
    # the next (good) download succeeds
    assert fetch(server.url, cache_dir=tmp_path, sha256=sha, progress=False).read_bytes() == body


def test_corrupted_cached_file_is_downloaded_again(serve, body, tmp_path):
    server = serve()
    path = cache_path(server.url, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(body[:-1] + b"!")
    sha = hashlib.sha256(body).hexdigest()
    assert fetch(server.url, cache_dir=tmp_path, sha256=sha, progress=False).read_bytes() == body
    assert len(server.requests) == 1


def test_broken_download_resumes_with_a_range_request(serve, body, tmp_path):
    server = serve(["truncate"])
    path = fetch(server.url, cache_dir=tmp_path, sha256=hashlib.sha256(body).hexdigest(), progress=False, backoff=0)
    assert path.read_bytes() == body
    first, second = [r.get("Range") for r in server.requests]
    resumed_at = int(second.removeprefix("bytes=").removesuffix("-"))
    assert first is None and 0 < resumed_at <= len(body) // 2  # what had arrived whole, then the rest
    assert files_in(tmp_path) == ["instruction-data.json"]


def test_server_that_ignores_the_range_is_read_from_the_start(serve, body, tmp_path):
    server = serve(["truncate", "ignore-range"])
    path = fetch(server.url, cache_dir=tmp_path, sha256=hashlib.sha256(body).hexdigest(), progress=False, backoff=0)
    assert path.read_bytes() == body
    assert len(server.requests) == 2 and server.requests[1].get("Range", "").startswith("bytes=")


def test_a_wrong_range_is_discarded_and_read_again(serve, body, tmp_path):
    server = serve(["truncate", "wrong-range"])
    path = fetch(server.url, cache_dir=tmp_path, progress=False, backoff=0)
    assert path.read_bytes() == body
    assert [r.get("Range") is None for r in server.requests] == [True, False, True]


def test_server_errors_are_retried_then_reported(serve, body, tmp_path):
    server = serve([503, 500])
    assert fetch(server.url, cache_dir=tmp_path, progress=False, backoff=0).read_bytes() == body
    assert len(server.requests) == 3

    server = serve([500] * 10)
    with pytest.raises(MinisftError, match=r"failed after 3 attempts: HTTP 500"):
        fetch(server.url, cache_dir=tmp_path / "b", retries=2, progress=False, backoff=0)
    assert len(server.requests) == 3 and files_in(tmp_path / "b") == []


def test_not_found_fails_at_once(serve, tmp_path):
    server = serve([404])
    with pytest.raises(MinisftError, match="HTTP 404"):
        fetch(server.url, cache_dir=tmp_path, progress=False, backoff=0)
    assert len(server.requests) == 1 and files_in(tmp_path) == []


def test_unreachable_server_is_reported(tmp_path):
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as s:
        port = s.server_address[1]  # bound, then closed: nothing listens there
    with pytest.raises(MinisftError, match="failed after 2 attempts: ConnectionError"):
        fetch(f"http://127.0.0.1:{port}/x.json", cache_dir=tmp_path, retries=1, progress=False, backoff=0)


def test_local_paths_skip_the_download(book_data, body, tmp_path):
    local = book_data
    assert fetch(local, cache_dir=tmp_path) == local
    assert fetch(str(local), sha256=hashlib.sha256(body).hexdigest().upper()) == local
    with pytest.raises(MinisftError, match="sha256 is"):
        fetch(local, sha256="0" * 64)
    assert local.is_file()  # a user's own file is never deleted
    with pytest.raises(MinisftError, match="no such file"):
        fetch(tmp_path / "missing.json")
    assert files_in(tmp_path) == []


def test_records_and_cli_from_a_url(serve, tmp_path, capsys):
    server = serve()
    assert len(load_records(server.url, cache_dir=tmp_path)) == 1100
    from minisft.cli import main
    assert main(["data", "stats", server.url, "--cache-dir", str(tmp_path / "cli")]) == 0
    assert "1100 records" in capsys.readouterr().out
    assert files_in(tmp_path / "cli") == ["instruction-data.json"]


def test_the_default_data_is_the_bundled_copy_of_the_books_file_and_never_downloads(book_data, body,
                                                                                    monkeypatch):
    asked = []
    monkeypatch.setattr(minisft.data, "fetch", lambda source, *args: asked.append(source) or source)
    assert load_records() == load_records(book_data)
    assert asked == [book_data]  # only the local file went through fetch
    assert hashlib.sha256(Path(minisft.data.BUNDLED_DATA).read_bytes()).hexdigest() == DEFAULT_DATA_SHA256
    assert hashlib.sha256(body).hexdigest() == DEFAULT_DATA_SHA256


def test_a_download_off_a_terminal_writes_plain_progress_lines_in_bytes(serve, tmp_path, capsys, monkeypatch):
    """Captured stderr is no terminal (a log file, CI): plain lines with scaled byte counts, no carriage returns."""
    import minisft.progress
    monkeypatch.setattr(minisft.progress, "PLAIN_EVERY_S", 0.0)  # a line at every chunk
    fetch(serve().url, cache_dir=tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()
    assert err.splitlines()[-1].startswith("instruction-data.json: 199kB/199kB (100%)")
