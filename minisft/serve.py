"""An OpenAI-compatible HTTP server for a model, and the chat page at GET /.

    POST /v1/chat/completions   messages rendered in the model's prompt style
    POST /v1/completions        a raw prompt (text or token ids)
    GET  /v1/models             the one model served
    GET  /                      the chat page (chat.html beside this module; no external assets)

Requests are validated against OpenAI's fields before any work: an unknown field, a wrong type, a
value out of range, a prompt that leaves no room in the context or an unknown model name gets
OpenAI's error object ({"error": {"message", "type", "param", "code"}}) with a 4xx status. Fields
OpenAI has that this engine cannot honour (n > 1, penalties, logprobs...) are accepted only at
their neutral value, so nothing is silently ignored. `stream: true` answers with server-sent
events in OpenAI's chunk format, ending with `data: [DONE]`.

The HTTP layer is the standard library's ThreadingHTTPServer: one thread per connection, each
waiting on its Job's events while the one scheduler thread (minisft.scheduler) decodes every
running job together. A client that goes away is noticed when a write fails (streaming) or when
its socket reads end-of-file (while waiting), and its job is cancelled, freeing its cache row.
"""
import hmac
import json
import logging
import queue
import select
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files

import numpy as np

from . import tokenizer
from .scheduler import Job, Scheduler

log = logging.getLogger("minisft.serve")

MAX_BODY = 4 << 20        # bytes: far more than any prompt that fits a GPT-2 context
MAX_STOPS = 4             # OpenAI's limit on stop sequences
WAIT = 0.2                # seconds between checks that a waiting client is still there

# field -> its neutral value: accepted at that value only (or null), refused otherwise.
NEUTRAL = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False, "top_logprobs": 0,
           "logit_bias": {}, "best_of": 1, "suffix": "", "parallel_tool_calls": True, "tools": [],
           "response_format": {"type": "text"}}
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream", "stream_options",
          "user", "n", "presence_penalty", "frequency_penalty", "logit_bias"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format",
                        "tools", "parallel_tool_calls"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "logprobs", "best_of", "suffix"}
ROLES = ("system", "developer", "user", "assistant")  # developer: OpenAI's newer name for system


class ApiError(Exception):
    def __init__(self, status, message, param=None, code=None, type_="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- request validation --------------------------------------------------------------------------------
def _typed(body, name, kinds, what, default=None):
    """body[name] if it is one of kinds (bool is never a number), else the ApiError naming it."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
        raise ApiError(400, f"{name} must be {what}, got {json.dumps(value)[:40]}", param=name,
                       code="invalid_type")
    return value


def _in_range(body, name, lo, hi, what, default, kinds=(int, float), open_lo=False):
    value = _typed(body, name, kinds, what, default)
    if value is None:
        return None
    if not (lo < value if open_lo else lo <= value) or value > hi:
        raise ApiError(400, f"{name} must be {what}, got {value}", param=name, code="invalid_value")
    return value


def _text_content(content, where):
    """A message's content: a string, or OpenAI's list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"{where}.content must be a string or a list of text parts", param=where,
                   code="invalid_type")


def _messages(body) -> list:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list of messages", param="messages",
                       code="invalid_type" if msgs is not None else "missing_required_parameter")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"{where} must be an object whose role is one of {', '.join(ROLES)}", param=where)
        role = "system" if m["role"] == "developer" else m["role"]
        if role == "system" and i:
            raise ApiError(400, f"{where}: a system message may only come first (the prompt styles have one "
                           "system part)", param=where)
        out.append({"role": role, "content": _text_content(m.get("content"), where)})
    if out[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's: the model answers it", param="messages")
    return out


def _stops(body) -> list:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not (isinstance(stops, list) and len(stops) <= MAX_STOPS and all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them",
                       param="stop", code="invalid_value")
    return stops


def parse_request(body, kind, *, model_name, style, context_length, defaults) -> dict:
    """A request body (parsed JSON) -> what the scheduler and the response need; ApiError if bad.

    kind: "chat" or "completion". defaults: the command line's max_tokens, temperature, top_k, top_p
    for requests that leave them out."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    known = CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS
    for name in body:
        if name not in known:
            raise ApiError(400, f"Unrecognized request argument supplied: {name}", param=name,
                           code="unknown_parameter")
    for name, neutral in NEUTRAL.items():
        if name in known and body.get(name) not in (None, neutral):
            raise ApiError(400, f"{name} is not supported here (only {json.dumps(neutral)})", param=name,
                           code="unsupported_value")
    if not isinstance(body.get("model"), str):
        raise ApiError(400, "model must be a string naming the model", param="model",
                       code="missing_required_parameter")
    if body["model"] != model_name:
        raise ApiError(404, f"The model `{body['model']}` does not exist; this server serves `{model_name}`",
                       param="model", code="model_not_found")
    _typed(body, "user", (str,), "a string")
    if kind == "chat":
        prompt = tokenizer.encode(style.prompt(_messages(body)))
        echo = False
    else:
        prompt, echo = _prompt_ids(body), _typed(body, "echo", (bool,), "a boolean", False)
    if len(prompt) >= context_length:
        raise ApiError(400, f"This model's maximum context length is {context_length} tokens; the prompt has "
                       f"{len(prompt)}, leaving no room for a completion", param="messages" if kind == "chat"
                       else "prompt", code="context_length_exceeded")
    room = context_length - len(prompt)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _in_range(body, name, 1, float("inf"), "an integer >= 1", None, kinds=(int,))
    if max_tokens is not None and max_tokens > room:
        raise ApiError(400, f"This model's maximum context length is {context_length} tokens; you requested "
                       f"{len(prompt) + max_tokens} ({len(prompt)} in the prompt, {max_tokens} for the completion)",
                       param=name, code="context_length_exceeded")
    stream = _typed(body, "stream", (bool,), "a boolean", False)
    options = _typed(body, "stream_options", (dict,), "an object", {})
    if options and (not stream or set(options) - {"include_usage"}
                    or not isinstance(options.get("include_usage", False), bool)):
        raise ApiError(400, "stream_options takes only include_usage (a boolean), and only with stream: true",
                       param="stream_options", code="invalid_value")
    return dict(
        kind=kind, prompt=prompt, echo=echo, stream=stream, include_usage=options.get("include_usage", False),
        max_tokens=max_tokens or min(defaults["max_tokens"], room), stop=_stops(body),
        temperature=_in_range(body, "temperature", 0, 2, "a number in [0, 2]", defaults["temperature"]),
        top_p=_in_range(body, "top_p", 0, 1, "a number in (0, 1]", defaults["top_p"], open_lo=True),
        top_k=_in_range(body, "top_k", 1, tokenizer.EOT + 1, f"an integer in [1, {tokenizer.EOT + 1}]",
                        defaults["top_k"], kinds=(int,)),
        seed=_in_range(body, "seed", 0, 2**64 - 1, "an integer in [0, 2**64)", None, kinds=(int,)))


def _prompt_ids(body) -> list:
    """A completion prompt: a string, token ids, or a list holding one of those."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                   and 0 <= t <= tokenizer.EOT for t in prompt):
        return prompt
    raise ApiError(400, "prompt must be a non-empty string or token ids in [0, 50256] (one prompt per request)",
                   param="prompt", code="invalid_value" if prompt is not None else "missing_required_parameter")


# ---- responses -------------------------------------------------------------------------------------------
def _usage(req, job) -> dict:
    n, m = len(req["prompt"]), job.completion_tokens
    return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}


def _choice(req, text, finish_reason, delta=False) -> dict:
    if req["kind"] == "completion":
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    key = "delta" if delta else "message"
    message = {"content": text} if delta else {"role": "assistant", "content": text}
    return {"index": 0, key: message, "logprobs": None, "finish_reason": finish_reason}


def _envelope(req, rid, created, model_name, chunk=False) -> dict:
    obj = {"chat": "chat.completion", "completion": "text_completion"}[req["kind"]]
    return {"id": rid, "object": obj + (".chunk" if chunk and req["kind"] == "chat" else ""),
            "created": created, "model": model_name}


class _Gone(Exception):
    """The client closed its connection."""


# ---- HTTP ----------------------------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive; streams use chunked transfer encoding
    server_version = "minisft"

    def log_message(self, fmt, *args):
        log.info("%s %s", self.address_string(), fmt % args)

    # -- plumbing --
    def _send(self, status, body: bytes, content_type="application/json", close=False):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status, obj, close=False):
        self._send(status, json.dumps(obj).encode(), close=close)

    def _chunk(self, data: bytes):
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except OSError as e:  # BrokenPipe, ConnectionReset: the client is gone
            raise _Gone from e

    def _event(self, obj):
        self._chunk(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")

    def _client_gone(self) -> bool:
        """A closed connection reads end-of-file; a live one has nothing to read while it waits."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _authorized(self) -> bool:
        key = self.server.api_key
        if key is None:
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {key}".encode())

    def _read_json(self):
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            raise ApiError(411, "send the body with a Content-Length")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise ApiError(400, "Content-Length is not a number") from None
        if length > MAX_BODY:
            raise ApiError(413, f"the request body exceeds {MAX_BODY} bytes")
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    # -- routes --
    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/":
            return self._send(200, self.server.page, "text/html; charset=utf-8")
        if not path.startswith("/v1/"):
            return self._json(404, ApiError(404, f"no route {path}", code="not_found").body())
        if not self._authorized():
            return self._json(401, ApiError(401, "Incorrect API key provided: send it as 'Authorization: "
                                                 "Bearer KEY'", code="invalid_api_key").body())
        card = {"id": self.server.model_name, "object": "model", "created": self.server.created,
                "owned_by": "minisft"}
        if path == "/v1/models":
            return self._json(200, {"object": "list", "data": [card]})
        if path == f"/v1/models/{self.server.model_name}":
            return self._json(200, card)
        self._json(404, ApiError(404, f"no route {path}", code="not_found").body())

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        kind = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}.get(path)
        body_read = False
        try:
            if kind is None:
                raise ApiError(404, f"no route {path}", code="not_found")
            if not self._authorized():
                raise ApiError(401, "Incorrect API key provided: send it as 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
            body = self._read_json()
            body_read = True
            req = parse_request(body, kind, **self.server.request_settings)
        except ApiError as e:  # an unread body would be misread as the next request: close instead
            return self._json(e.status, e.body(), close=not body_read)
        seed = req["seed"] if req["seed"] is not None else self.server.next_seed()
        job = Job(req["prompt"], req["max_tokens"], tokenizer.decode, temperature=req["temperature"],
                  top_k=req["top_k"], top_p=req["top_p"], stop=req["stop"], seed=seed)
        self.server.scheduler.submit(job)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        try:
            (self._stream if req["stream"] else self._complete)(req, job, rid, int(time.time()))
        except _Gone:
            job.cancel()
            self.close_connection = True

    def _events(self, job):
        """The job's events as they come; _Gone as soon as the client leaves (checked at every event and
        every WAIT seconds without one: a select() costs microseconds, a decode step milliseconds)."""
        while True:
            try:
                event = job.events.get(timeout=WAIT)
            except queue.Empty:
                event = None
            if self._client_gone():
                raise _Gone
            if event is None:
                continue
            yield event
            if event[0] != "text":
                return

    def _complete(self, req, job, rid, created):
        text = tokenizer.decode(req["prompt"]) if req["echo"] else ""
        for kind, value in self._events(job):
            if kind == "text":
                text += value
            elif kind == "error":
                return self._json(500, ApiError(500, value, type_="server_error").body())
        out = _envelope(req, rid, created, self.server.model_name)
        out.update(choices=[_choice(req, text, job.finish_reason)], usage=_usage(req, job))
        self._json(200, out)

    def _stream(self, req, job, rid, created):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        head = _envelope(req, rid, created, self.server.model_name, chunk=True)

        def chunk(choice):
            return dict(head, choices=[choice])
        if req["kind"] == "chat":  # OpenAI's first chunk carries the role; the last one only the finish
            self._event(chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None}))
        elif req["echo"]:
            self._event(chunk(_choice(req, tokenizer.decode(req["prompt"]), None, delta=True)))
        for kind, value in self._events(job):
            if kind == "text":
                self._event(chunk(_choice(req, value, None, delta=True)))
            elif kind == "error":
                self._event(ApiError(500, value, type_="server_error").body())
            elif req["kind"] == "chat":
                self._event(chunk({"index": 0, "delta": {}, "logprobs": None, "finish_reason": job.finish_reason}))
            else:
                self._event(chunk(_choice(req, "", job.finish_reason, delta=True)))
        if req["include_usage"]:
            self._event(dict(head, choices=[], usage=_usage(req, job)))
        self._event(b"[DONE]")
        self._chunk(b"")


class Server(ThreadingHTTPServer):
    """The HTTP server and its scheduler: serve_forever() answers requests, close() stops both."""
    daemon_threads = True

    def __init__(self, model, style, *, host="127.0.0.1", port=8000, model_name="minisft", api_key=None,
                 max_batch=16, defaults=None, seed=None):
        self.model_name, self.api_key, self.created = model_name, api_key, int(time.time())
        self.request_settings = dict(model_name=model_name, style=style, context_length=model.cfg.context_length,
                                     defaults={"max_tokens": 256, "temperature": 0.0, "top_k": None,
                                               "top_p": None, **(defaults or {})})
        self.page = files("minisft").joinpath("chat.html").read_bytes()
        self._seeds, self._seed_lock = np.random.default_rng(seed), threading.Lock()
        self.scheduler = Scheduler(model, max_batch)
        super().__init__((host, port), Handler)
        self.scheduler.start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def next_seed(self) -> int:
        """A seed for a request that brings none (reproducible from the server's --seed)."""
        with self._seed_lock:
            return int(self._seeds.integers(2**63))

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.scheduler.stop()


def is_loopback(host) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def kv_cache_bytes(model, n_seqs) -> int:
    """The KV cache of n_seqs full-context sequences (keys and values, every layer), in the element
    type the backend allocates it in."""
    cfg = model.cfg
    return 2 * cfg.n_layers * n_seqs * cfg.context_length * cfg.emb_dim * model.B.kv_dtype.itemsize

