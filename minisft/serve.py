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
running job together. A client that goes away is noticed when a write fails, and its job is
cancelled, freeing its cache row. A client whose socket reads end-of-file while it waits may have
closed it or only half-closed it (shut down its sending side, still reading): the server then
writes a probe no client shows (an interim `100 Continue`, or an event-stream comment) and a closed
socket answers it with a reset, which the next check reads.

What any client can make the server hold is bounded, with or without --api-key:
    body      a Content-Length of digits up to MAX_BODY; no Transfer-Encoding (411: send a length);
              JSON nesting to MAX_DEPTH; the whole body read within the read timeout
    stops     at most MAX_STOPS stop strings of at most MAX_STOP_CHARS characters, each matched once
              per new character (minisft.scheduler's KMP matcher, never a rescan of the answer)
    waiting   at most max_waiting requests queued, max_waiting_per_client of them per client address
              (429 past either), admitted in turn between clients
    threads   at most max_connections connections at once (503 to the one past it)
    time      a connection that sends nothing for read_timeout seconds is closed
A client that resets its connection costs one log line, never a traceback.
"""
import hmac
import json
import logging
import queue
import select
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files

import numpy as np

from . import tokenizer
from .scheduler import Job, QueueFull, Scheduler

log = logging.getLogger("minisft.serve")

MAX_BODY = 4 << 20        # bytes: far more than any prompt that fits a GPT-2 context
MAX_DEPTH = 16            # JSON nesting: a request needs 4 (messages[].content[].text)
MAX_STOPS = 4             # OpenAI's limit on stop sequences
MAX_STOP_CHARS = 256      # characters of one stop string: a few lines of text, far past any stop marker
MAX_TEMPERATURE = 2       # OpenAI's range for temperature is [0, 2]
WAIT = 0.2                # seconds between checks that a waiting client is still there
READ_TIMEOUT = 30.0       # seconds a connection may send nothing (idle keep-alive, a stalled body)
MAX_CONNECTIONS = 256     # connections (threads) at once

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
        # name, tool_calls, ...: the prompt styles render a role and a text, nothing else would reach the
        # model. Null is accepted: the official client's message objects carry their unset fields as null.
        extra = next((k for k, v in m.items() if k not in ("role", "content") and v is not None), None)
        if extra is not None:
            raise ApiError(400, f"{where}.{extra} is not supported here: a prompt style renders only role and "
                           "content", param=f"{where}.{extra}", code="unsupported_value")
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
    if not (isinstance(stops, list) and len(stops) <= MAX_STOPS
            and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise ApiError(400, f"stop must be a string of 1 to {MAX_STOP_CHARS} characters or a list of at most "
                       f"{MAX_STOPS} of them", param="stop", code="invalid_value")
    return stops


def _too_deep(obj) -> bool:
    """Whether obj nests deeper than MAX_DEPTH (walked without recursion, so any depth is safe to ask)."""
    level = [obj]
    for _ in range(MAX_DEPTH):
        level = [v for x in level if isinstance(x, (dict, list)) for v in (x.values() if isinstance(x, dict) else x)]
        if not level:
            return False
    return True


def parse_request(body, kind, *, model_name, style, context_length, defaults, tok=tokenizer.GPT2,
                  vocab_size=tokenizer.GPT2.vocab_size) -> dict:
    """A request body (parsed JSON) -> what the scheduler and the response need; ApiError if bad.

    kind: "chat" or "completion". defaults: the command line's max_tokens, temperature, top_k, top_p
    for requests that leave them out. tok: the model's tokenizer; vocab_size: its logits' width."""
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
        prompt = tok.encode(style.prompt(_messages(body)))
        echo = False
    else:
        prompt, echo = _prompt_ids(body, tok, vocab_size), _typed(body, "echo", (bool,), "a boolean", False)
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
        temperature=_in_range(body, "temperature", 0, MAX_TEMPERATURE, f"a number in [0, {MAX_TEMPERATURE}]",
                              defaults["temperature"]),
        top_p=_in_range(body, "top_p", 0, 1, "a number in (0, 1]", defaults["top_p"], open_lo=True),
        top_k=_in_range(body, "top_k", 1, vocab_size, f"an integer in [1, {vocab_size}]", defaults["top_k"],
                        kinds=(int,)),
        seed=_in_range(body, "seed", 0, 2**64 - 1, "an integer in [0, 2**64)", None, kinds=(int,)))


def _prompt_ids(body, tok, vocab_size) -> list:
    """A completion prompt: a string, token ids, or a list holding one of those."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return tok.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                   and 0 <= t < vocab_size for t in prompt):
        return prompt
    raise ApiError(400, f"prompt must be a non-empty string or token ids in [0, {vocab_size - 1}] (one prompt per "
                   "request)",
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
    probe: bytes | None = None      # what _client_gone may write to tell a closed client from a half-closed one
    probed = False                  # whether it did, in this request

    def setup(self):
        self.timeout = self.server.read_timeout  # StreamRequestHandler.setup sets it on the socket
        super().setup()

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

    @staticmethod
    def _framed(data: bytes) -> bytes:
        """data as one chunk of a chunked transfer."""
        return b"%x\r\n%s\r\n" % (len(data), data)

    def _chunk(self, data: bytes):
        try:
            self.wfile.write(self._framed(data))
            self.wfile.flush()
        except OSError as e:  # BrokenPipe, ConnectionReset: the client is gone
            raise _Gone from e

    def _event(self, obj):
        self._chunk(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")

    def _client_gone(self) -> bool:
        """A live client has nothing to send while it waits. End-of-file means it closed its socket or
        only half-closed it: the first time, write the probe; a closed socket answers it with a reset,
        which leaves an error on the socket (recv() reports only the end-of-file that came first). With
        no probe to write, end-of-file is taken as gone."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable or self.connection.recv(1, socket.MSG_PEEK) != b"":
                return False
            if self.probe is None:
                return True
            if not self.probed:  # once: end-of-file stays readable from now on
                self.wfile.write(self.probe)
                self.wfile.flush()
                self.probed = self.close_connection = True  # no further request can come
                return False
            return self.connection.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
        except OSError:
            return True

    def _authorized(self) -> bool:
        key = self.server.api_key
        if key is None:
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {key}".encode())

    def _read_json(self):
        """The body as parsed JSON; ApiError for a body whose size is not stated as one plain Content-Length
        (rfile.read(-1) would read to end-of-file, unbounded), too big, slow, or not JSON of sane depth."""
        if self.headers.get_all("Transfer-Encoding"):  # header names are matched in any case
            raise ApiError(411, "send the body with a Content-Length, not a Transfer-Encoding")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise ApiError(411, "a request body needs a Content-Length")
        if len(set(lengths)) != 1 or not (lengths[0].isascii() and lengths[0].isdigit()):  # int() takes "-1", " +5"
            raise ApiError(400, f"Content-Length must be one number of bytes, got {', '.join(lengths)[:40]!r}")
        if len(lengths[0]) > len(str(MAX_BODY)) or int(lengths[0]) > MAX_BODY:
            raise ApiError(413, f"the request body exceeds {MAX_BODY} bytes")
        raw = self._read_body(int(lengths[0]))
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        except UnicodeDecodeError:
            raise ApiError(400, "the request body is not UTF-8 text", code="invalid_json") from None
        except ValueError:  # Python's limit on the digits of an integer it parses
            raise ApiError(400, "the request body holds an integer of more than 4300 digits",
                           code="invalid_json") from None
        except RecursionError:
            raise ApiError(400, "the request body nests too deeply", code="invalid_json") from None
        if _too_deep(body):
            raise ApiError(400, f"the request body nests deeper than {MAX_DEPTH} levels", code="invalid_json")
        return body

    def _read_body(self, length) -> bytes:
        """length bytes of body, all within the read timeout (a client dripping a byte at a time would
        keep each read short and the thread held)."""
        deadline, parts, got = time.monotonic() + self.server.read_timeout, [], 0
        while got < length:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the body took longer than {self.server.read_timeout:g} s")
            self.connection.settimeout(left)
            part = self.rfile.read1(length - got)
            if not part:
                raise ConnectionError("the client closed its connection mid-body")
            parts.append(part)
            got += len(part)
        self.connection.settimeout(self.server.read_timeout)
        return b"".join(parts)

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
        tok = self.server.request_settings["tok"]
        job = Job(req["prompt"], req["max_tokens"], tok.decode, temperature=req["temperature"],
                  top_k=req["top_k"], top_p=req["top_p"], stop=req["stop"], seed=seed, stops=tok.stops)
        try:  # a client is its address: the key, where there is one, is the same for every client
            self.server.scheduler.submit(job, client=self.client_address[0])
        except QueueFull as e:
            return self._json(429, ApiError(429, f"Too many requests: {e}; retry later", code="rate_limit_exceeded",
                                            type_="requests").body())
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        # The probe for a half-closed client: an interim response before the answer, which HTTP/1.1
        # clients skip (HTTP/1.0 ones know none, so for them end-of-file means gone); in a stream, a comment.
        self.probe = (self._framed(b": probe\n\n") if req["stream"] else
                      b"HTTP/1.1 100 Continue\r\n\r\n" if self.request_version == "HTTP/1.1" else None)
        self.probed = False
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
        text = self.server.request_settings["tok"].decode(req["prompt"]) if req["echo"] else ""
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
            self._event(chunk(_choice(req, self.server.request_settings["tok"].decode(req["prompt"]), None,
                                      delta=True)))
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

    def __init__(self, model, style, *, tok=tokenizer.GPT2, host="127.0.0.1", port=8000, model_name="minisft",
                 api_key=None,
                 max_batch=16, defaults=None, seed=None, read_timeout=READ_TIMEOUT, max_connections=MAX_CONNECTIONS,
                 max_waiting=256, max_waiting_per_client=32):
        self.model_name, self.api_key, self.created = model_name, api_key, int(time.time())
        self.read_timeout, self.max_connections = read_timeout, max_connections
        self._connections = threading.BoundedSemaphore(max_connections)  # a slot per handler thread
        self.request_settings = dict(model_name=model_name, style=style, context_length=model.cfg.context_length,
                                     tok=tok, vocab_size=model.cfg.vocab_size,
                                     defaults={"max_tokens": 256, "temperature": 0.0, "top_k": None, "top_p": None,
                                               **(defaults or {})})
        self.page = files("minisft").joinpath("chat.html").read_bytes()
        self._seeds, self._seed_lock = np.random.default_rng(seed), threading.Lock()
        self.scheduler = Scheduler(model, max_batch, max_waiting, max_waiting_per_client)
        super().__init__((host, port), Handler)
        self.scheduler.start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def process_request(self, request, client_address):
        """A thread for the connection if one is free; else a 503 from the listening thread, at once:
        a connection past the limit is answered and closed, never queued behind the held ones."""
        if not self._connections.acquire(blocking=False):
            body = json.dumps(ApiError(503, f"the server holds {self.max_connections} connections already; retry "
                                            "later", type_="server_error").body()).encode()
            try:
                request.setblocking(False)  # a client that reads nothing cannot hold the listener
                request.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                             b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass  # it is being closed anyway
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: the slot is free again
            self._connections.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    def handle_error(self, request, client_address):
        """A client that resets, times out or hangs up mid-request: one line; anything else: the traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            log.info("%s dropped: %s: %s", client_address[0], type(error).__name__, error)
        else:
            log.exception("request from %s failed", client_address[0])

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

