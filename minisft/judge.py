"""Score model responses 0-100 with a local Ollama model, as chapter 7 of the book does.

Each entry of a responses file (the book's instruction-data-with-response.json format) is sent to
the server's /api/chat with the book's scoring prompt and options (seed 123, temperature 0,
num_ctx 2048); the streamed JSON lines are joined into the reply and a score is read from it.
Unlike the book, a reply with no clear score is counted and listed rather than dropped silently, and a
network failure mid-run names the entry it hit while the scores finished before it are kept.

The scores file is rewritten atomically as scoring goes (at most a second behind, and at any exit),
so a crash, a kill or Ctrl-C keeps what was scored; running again continues with the entries not
yet scored (and those whose reply had no usable shape), and never holds fewer scores than before.
Each result carries a key (a hash of its scoring prompt) tying it to its entry and the judge model that
scored it, so the scores of another responses file, of another judge or a result repeated are refused
rather than mixed in.

A reply is bounded in time and size: --timeout is the most seconds from sending a prompt to the reply's
last line, however the server paces it, and a reply of more than MAX_REPLY bytes that never says done
is a failed entry, not a memory bomb.
"""
import hashlib
import json
import math
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests
import urllib3

from .data import format_input
from .errors import MinisftError
from .progress import tracked

DEFAULT_URL = "http://localhost:11434"
OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}  # the book's: a deterministic judge
DEFAULT_TIMEOUT = 120.0  # seconds to connect, and for the whole of a reply
SAVE_EVERY = 1.0  # seconds between rewrites of the scores file
MAX_REPLY = 1 << 20  # bytes of a streamed reply: a score takes a few hundred; thousands of tokens fit
READ = 8192  # bytes asked of the socket at once


class ServerError(Exception):
    """The server failed mid-reply: an error message in the stream, an HTTP error, or a cut-off reply."""


class BadReply(Exception):
    """A reply of a shape no Ollama server sends (content that is no string, ...): that entry fails."""


def score_prompt(entry: dict) -> str:
    """The book's scoring prompt, word for word."""
    return (f"Given the input `{format_input(entry)}` and correct output `{entry['output']}`, "
            f"score the model response `{entry['model_response']}` on a scale from 0 to 100, where 100 is "
            "the best score. Respond with the integer number only.")


# ---- reading a score out of a reply ------------------------------------------------------------------
_NUM = r"(-?\d+(?:\.\d+)?)"
_OUT_OF_100 = re.compile(_NUM + r"\s*(?:/|out of)\s*100(?!\.?\d)", re.I)   # "70/100", "95 out of 100"
_SCORE_IS = re.compile(r"\bscore\b\s*(?:of|is|:|=)?\s*" + _NUM, re.I)       # "Score: 40", "score of 85"
_SCALE = re.compile(r"\b0\s*(?:-|to)\s*100\b", re.I)                       # "0-100", "0 to 100": the scale
_ANY = re.compile(r"(?<![\w.])" + _NUM + r"(?![\w])")


def parse_score(reply: str) -> int | None:
    """The integer score 0-100 in a judge's reply, or None when there is none or it is ambiguous.

    Tried in order, the first that finds numbers decides: "N/100" or "N out of 100"; "score: N" (or
    "score of/is N"); any number left once the scale ("0 to 100") is removed. The numbers found must
    all be the same value, a whole number in [0, 100]; "80 or 90", "150", "85.5" give None."""
    for pattern in (_OUT_OF_100, _SCORE_IS, _ANY):
        found = pattern.findall(_SCALE.sub(" ", reply) if pattern is _ANY else reply)
        if found:
            values = {float(v) for v in found}
            if len(values) != 1:
                return None
            v = values.pop()
            return int(v) if v.is_integer() and 0 <= v <= 100 else None
    return None


# ---- talking to the server --------------------------------------------------------------------------------
def check_url(url: str) -> str:
    """--url without its trailing slash, or a MinisftError unless it is an http(s) address with a host
    (requests' errors for a misspelt scheme are ValueErrors that read like a bad answer)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise MinisftError(f"--url must be an http:// or https:// address with a host, such as {DEFAULT_URL}; "
                           f"got {url!r}")
    return url.rstrip("/")


def check_server(url: str, model: str) -> None:
    """Raise a MinisftError that says what to do unless the server answers and has the model."""
    try:
        r = requests.get(f"{url}/api/tags", timeout=10)
        r.raise_for_status()
    except requests.RequestException as e:
        raise MinisftError(f"cannot reach an Ollama server at {url} ({type(e).__name__}: {e}); start it with "
                           "`ollama serve` or point --url at a running one") from None
    try:
        tags = r.json()
    except (ValueError, RecursionError):
        raise MinisftError(f"{url}/api/tags did not answer JSON: is {url} an Ollama server?") from None
    if not isinstance(tags, dict) or not isinstance(tags.get("models", []), list):
        raise MinisftError(f"{url}/api/tags answered {str(tags)[:80]!r}, not Ollama's {{\"models\": [...]}}: is "
                           f"{url} an Ollama server?")
    names = {str(m.get("name", "")) for m in tags.get("models", []) if isinstance(m, dict)}
    if model not in names and f"{model}:latest" not in names:
        have = ", ".join(sorted(names)) or "none"
        raise MinisftError(f"the Ollama server at {url} has no model {model!r} (it has: {have}); "
                           f"run `ollama pull {model}`")


def query_model(prompt: str, model: str, url: str, timeout: float = DEFAULT_TIMEOUT) -> tuple[str, int]:
    """Send one chat message, read the streamed reply. -> (reply text, lines that were not JSON).

    Every line of the stream is a JSON object whose message.content is the next piece of the
    reply; the last one says done. Lines that are not JSON objects are skipped and counted; a
    message or content of another type, or a reply past MAX_REPLY bytes, raises BadReply.
    timeout: seconds to connect, and for the whole reply from the prompt sent to its last line."""
    payload: dict = {"model": model, "messages": [{"role": "user", "content": prompt}], "options": OPTIONS}
    pieces, junk = [], 0
    deadline = time.monotonic() + timeout
    with requests.post(f"{url}/api/chat", json=payload, stream=True, timeout=(timeout, timeout)) as r:
        if r.status_code != 200:
            first = next(_lines(r, deadline, timeout), b"")  # an error page is bounded too
            raise ServerError(f"HTTP {r.status_code}: {first[:200].decode('utf-8', 'replace')}")
        for line in _lines(r, deadline, timeout):
            if not line.strip():
                continue
            try:
                msg = json.loads(line)
            except (ValueError, RecursionError):  # not JSON, a 5000-digit number, nesting past the parser's depth
                msg = None
            if not isinstance(msg, dict):
                junk += 1
                continue
            if "error" in msg:
                raise ServerError(f"the server reported: {msg['error']}")
            message = msg.get("message", {})
            content = message.get("content", "") if isinstance(message, dict) else None
            if not isinstance(content, str):
                raise BadReply(f"message {json.dumps(message)[:80]} has no text content")
            pieces.append(content)
            if msg.get("done"):
                return "".join(pieces), junk
    raise ServerError("the reply ended before the server marked it done")


def _lines(r, deadline: float, timeout: float):
    """The lines of a streamed response as they arrive, ending by the deadline and within MAX_REPLY bytes.

    Each read returns as soon as any bytes come (read1) and may wait only the time left, so a server
    that drips a byte at a time cannot stretch the reply past the deadline."""
    buffer, size = b"", 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ServerError(f"the reply took longer than --timeout ({timeout:g} s)")
        sock = getattr(r.raw.connection, "sock", None)  # None once the body is all read in: nothing blocks
        if sock is not None:
            sock.settimeout(left)
        try:
            data = r.raw.read1(READ)
        except urllib3.exceptions.ReadTimeoutError:
            raise ServerError(f"the reply took longer than --timeout ({timeout:g} s)") from None
        except urllib3.exceptions.HTTPError as e:  # a reply cut off, a broken chunk
            raise ServerError(f"the reply broke off ({type(e).__name__}: {e})") from None
        if not data:
            if buffer:
                yield buffer
            return
        size += len(data)
        if size > MAX_REPLY:
            raise BadReply(f"the reply passed {MAX_REPLY} bytes without ending")
        *done, buffer = (buffer + data).split(b"\n")
        yield from done


def entry_key(entry) -> str:
    """Ties a result to the entry it scores: the first 16 hex digits of its prompt's sha256."""
    return hashlib.sha256(score_prompt(entry).encode("utf-8")).hexdigest()[:16]


def same_judge(a: str, b: str) -> bool:
    """Whether two judge model names are one model: Ollama reads a name without a tag as NAME:latest."""
    def tagged(name):
        return name if ":" in name else name + ":latest"
    return tagged(a) == tagged(b)


def judge_responses(entries, model, url=DEFAULT_URL, progress=True, timeout=DEFAULT_TIMEOUT, done=(), save=None):
    """Score the entries not in done, in order; stop at the first network or server failure.

    done: results of an earlier run (kept; those with an "error" are tried again). save: called
    with all results so far, at most SAVE_EVERY seconds apart and at any exit, Ctrl-C included.
    -> (results: [{"index", "key", "judge", "score" (int or None), "reply"} (+ "error" for a reply
    of no usable shape)] in index order, junk lines skipped, the failure as "entry i: ..." or None)."""
    results = {r["index"]: r for r in done}
    todo = [i for i in range(len(entries)) if i not in results or "error" in results[i]]
    junk, failure, saved = 0, None, time.monotonic()
    ordered = lambda: [results[i] for i in sorted(results)]  # noqa: E731
    try:
        for i in tracked(todo, "scoring", "entry", enabled=progress):
            result = {"index": i, "key": entry_key(entries[i]), "judge": model}
            try:
                reply, j = query_model(score_prompt(entries[i]), model, url, timeout)
            except BadReply as e:
                results[i] = {**result, "score": None, "reply": "", "error": str(e)}
            except (requests.RequestException, ServerError) as e:
                failure = f"entry {i}: {type(e).__name__}: {e}"
                break
            else:
                junk += j
                results[i] = {**result, "score": parse_score(reply), "reply": reply}
            if save and time.monotonic() - saved >= SAVE_EVERY:
                save(ordered())
                saved = time.monotonic()
    finally:
        if save:
            save(ordered())
    return ordered(), junk, failure


def load_scores(path, entries, model) -> list:
    """The results an earlier run saved in path ([] when there is none), checked against entries and
    the judge model: each result must score one entry of this file, once, by this judge."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MinisftError(f"{path}: an existing scores file that cannot be read ({e}); move it away or "
                           "choose another --out") from None
    if not isinstance(data, list):
        raise MinisftError(f"{path}: an existing file that is no scores list; move it away or choose another --out")
    seen: dict = {}  # entry index -> the result that scores it
    for n, r in enumerate(data):
        if not (isinstance(r, dict) and type(r.get("index")) is int and 0 <= r["index"] < len(entries)
                and "score" in r and "reply" in r):
            raise MinisftError(f"{path}: result {n} is not a score of one of the {len(entries)} entries; move "
                               "the file away or choose another --out")
        if r.get("key") != entry_key(entries[r["index"]]):
            raise MinisftError(f"{path}: result {n} scores another entry {r['index']} than this responses file's "
                               "(the responses changed?); choose another --out to score them afresh")
        if not (isinstance(r.get("judge"), str) and same_judge(r["judge"], model)):
            raise MinisftError(f"{path}: result {n} was scored by judge {r.get('judge')!r}, not --model {model!r}: "
                               "scores of two judges do not average; use that --model or choose another --out")
        if r["index"] in seen:
            raise MinisftError(f"{path}: results {seen[r['index']]} and {n} both score entry {r['index']}; move "
                               "the file away or choose another --out")
        seen[r["index"]] = n
    return data


def check_timeout(timeout) -> float:
    if not (math.isfinite(timeout) and timeout > 0):
        raise MinisftError(f"--timeout must be a positive number of seconds, got {timeout}")
    return timeout


# ---- files ----------------------------------------------------------------------------------------------------
def load_responses(path) -> list:
    """The book's responses format: a JSON list of {instruction, input, output, model_response}."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise MinisftError(f"{path}: cannot read the responses file ({e.strerror})") from None
    except ValueError as e:
        raise MinisftError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list) or not data:
        raise MinisftError(f"{path}: expected a non-empty JSON list of entries")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise MinisftError(f"{path}: record {i} is not a JSON object")
        for field in ("instruction", "output", "model_response"):
            if not isinstance(entry.get(field), str):
                problem = "is missing" if field not in entry else "must be a string"
                raise MinisftError(f"{path}: record {i}: field {field!r} {problem}")
        if not isinstance(entry.get("input", ""), str):
            raise MinisftError(f"{path}: record {i}: field 'input' must be a string")
    return data
