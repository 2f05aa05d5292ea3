"""`minisft serve` against hostile clients, on real sockets on 127.0.0.1: bodies whose size is not
stated plainly, stop strings built to be slow, a greedy client, idle, dripping, half-closed and
resetting connections. Each bound answers in OpenAI's error shape (or closes the connection) and the
server goes on serving. The model is the tiny random one tests/test_serve.py serves."""
import json
import logging
import random
import socket
import struct
import threading
import time

import pytest
import requests

from minisft import GPT, GPTConfig, tokenizer
from minisft.prompts import get_style
from minisft.scheduler import Job, QueueFull, Scheduler
from minisft.serve import Server

NAME = "tiny"
GOOD = dict(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
DEADLINE = 10  # seconds before a socket read gives up (a hang, not a timing check)


@pytest.fixture(scope="module")
def model():
    return GPT(GPTConfig.preset("gpt2-tiny"), dtype="float64", seed=7)


@pytest.fixture
def serve(model):
    """Starts a Server with the given settings; closes them all at the end."""
    started = []

    def start(**settings):
        s = Server(model, get_style("alpaca"), port=0, model_name=NAME, **settings)
        threading.Thread(target=s.serve_forever, daemon=True).start()
        started.append(s)
        return s
    yield start
    for s in started:
        s.close()


def connect(server) -> socket.socket:
    sock = socket.create_connection(server.server_address[:2])
    sock.settimeout(DEADLINE)
    return sock


def read_all(sock) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    while data := sock.recv(65536):
        out += data
    return out


def post(body: bytes, path="/v1/chat/completions") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" % path.encode() + body


def still_serves(server):
    r = requests.post(server.url + "/v1/chat/completions", json=GOOD, timeout=DEADLINE)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


GOOD_BYTES = json.dumps(GOOD).encode()


@pytest.mark.parametrize("headers, status", [
    (b"Content-Length: -1\r\n", 400),                   # rfile.read(-1) would read to end-of-file
    (b"Content-Length: +%d\r\n" % len(GOOD_BYTES), 400),
    (b"Content-Length: 1_0\r\n", 400),
    (b"Content-Length: abc\r\n", 400),
    (b"Content-Length: %d\r\nContent-Length: 3\r\n" % len(GOOD_BYTES), 400),
    (b"", 411),                                          # a body with no length
    (b"Transfer-Encoding: chunked\r\n", 411),
    (b"transfer-encoding: Chunked\r\n", 411),
    (b"TRANSFER-ENCODING: gzip\r\nContent-Length: %d\r\n" % len(GOOD_BYTES), 411),
    (b"Content-Length: 99999999999999999999\r\n", 413),
    (b"Content-Length: " + b"9" * 5000 + b"\r\n", 413),
])
def test_a_body_whose_size_is_not_one_plain_length_is_refused_and_the_connection_closed(serve, headers, status):
    server = serve()
    with connect(server) as sock:
        sock.sendall(post(headers + b"\r\n" + GOOD_BYTES))
        sock.shutdown(socket.SHUT_WR)  # what a client that sends to end-of-file does
        reply = read_all(sock)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status) and b"Connection: close" in head
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["message"].count("\n") == 0
    still_serves(server)


def naive_cut(text, stops):
    """Where the text is cut when it grows a character at a time: at the first length where a stop
    string occurs, at the earliest start among them (None: never)."""
    for n in range(1, len(text) + 1):
        starts = [text[:n].find(s) for s in stops if s in text[:n]]
        if starts:
            return min(starts)
    return None


def test_stop_strings_are_matched_as_a_rescan_would_on_random_texts():
    rng = random.Random(0)
    decode = lambda ids: "".join("ab"[i] for i in ids)  # noqa: E731  one token, one character
    for _ in range(300):
        ids = [rng.randrange(2) for _ in range(rng.randrange(1, 30))]
        stops = ["".join(rng.choice("ab") for _ in range(rng.randrange(1, 6))) for _ in range(rng.randrange(1, 4))]
        job = Job([0], len(ids), decode, stop=stops)
        for i in ids:
            if not job.push(i):
                break
        got = "".join(v for k, v in list(job.events.queue) if k == "text")
        text, cut = decode(ids), naive_cut(decode(ids), stops)
        assert got == (text if cut is None else text[:cut]), (text, stops)
        assert job.finish_reason == ("length" if cut is None else "stop")


def test_stop_matching_costs_the_same_per_token_however_long_the_answer():
    """The longest stop strings allowed, on an answer of 400,000 characters that nearly matches both
    all along: a rescan per token would copy and search the whole answer each time (minutes)."""
    decode = lambda ids: "a" * (400 * len(ids))  # noqa: E731  a token of 400 characters
    job = Job([0], 1000, decode, stop=["a" * 255 + "b", "ab" * 128])
    start = time.monotonic()
    while job.push(1):
        pass
    assert time.monotonic() - start < 3 and job.finish_reason == "length"


def test_admission_takes_clients_in_turn_and_bounds_each_ones_share(model):
    sched = Scheduler(model, max_batch=1, max_waiting=6, max_waiting_per_client=4)
    prompt = tokenizer.encode("Hi")
    greedy = [sched.submit(Job(prompt, 3, tokenizer.decode), client="greedy") for _ in range(4)]
    with pytest.raises(QueueFull, match="this client has 4 requests waiting already"):
        sched.submit(Job(prompt, 3, tokenizer.decode), client="greedy")
    other = sched.submit(Job(prompt, 3, tokenizer.decode), client="other")
    third = sched.submit(Job(prompt, 3, tokenizer.decode), client="third")
    with pytest.raises(QueueFull, match="6 requests are waiting already"):
        sched.submit(Job(prompt, 3, tokenizer.decode), client="fourth")
    jobs, ended = greedy + [other, third], []
    while len(ended) < len(jobs):
        sched.step()
        ended += [j for j in jobs if j.finish_reason and j not in ended]
    # one at a time (max_batch 1), in turn: not after all four of the greedy client's
    assert ended == [greedy[0], other, third, *greedy[1:]]


def test_a_client_past_its_share_gets_a_429_and_others_are_still_served(serve):
    server = serve(max_batch=1, max_waiting_per_client=1)
    body = json.dumps(dict(GOOD, max_tokens=200, stream=True)).encode()
    with connect(server) as running, connect(server) as waiting:
        running.sendall(post(b"Content-Length: %d\r\n\r\n%s" % (len(body), body)))
        assert running.recv(100).startswith(b"HTTP/1.1 200")  # admitted: it streams
        waiting.sendall(post(b"Content-Length: %d\r\n\r\n%s" % (len(body), body)))
        deadline = time.monotonic() + DEADLINE
        while server.scheduler.n_waiting == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = requests.post(server.url + "/v1/chat/completions", json=GOOD, timeout=DEADLINE)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        assert "this client has 1 requests waiting already" in r.json()["error"]["message"]


def test_connections_past_the_limit_get_a_503_at_once_and_idle_ones_are_closed(serve):
    server = serve(max_connections=2, read_timeout=0.5)
    idle = [connect(server) for _ in range(2)]  # connected, sending nothing: each holds a thread
    try:
        time.sleep(0.1)
        with connect(server) as third:
            reply = read_all(third)
        assert reply.startswith(b"HTTP/1.1 503") and json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["message"]
        start = time.monotonic()
        assert [read_all(s) for s in idle] == [b"", b""]  # the server closed them
        assert time.monotonic() - start < 3
    finally:
        for s in idle:
            s.close()
    still_serves(server)


def test_a_body_dripped_a_byte_at_a_time_is_cut_off_at_the_read_timeout(serve):
    server = serve(read_timeout=0.5)
    with connect(server) as sock:
        sock.sendall(post(b"Content-Length: %d\r\n\r\n" % len(GOOD_BYTES)))
        start = time.monotonic()
        with pytest.raises(OSError):  # the server hangs up: a write fails, or a read sees the reset
            for byte in GOOD_BYTES:
                sock.sendall(bytes([byte]))
                time.sleep(0.05)  # each read waits far less than the timeout
            assert read_all(sock) == b""
            raise ConnectionResetError("closed")
        assert time.monotonic() - start < 3
    still_serves(server)


def test_clients_that_reset_their_connections_cost_a_line_each_and_no_traceback(serve, caplog, capfd):
    server = serve()
    caplog.set_level(logging.INFO, logger="minisft.serve")
    for partial in [b"", post(b"Content-Length: 100\r\n\r\n{"), b"POST /v1/chat"] * 3:
        with connect(server) as sock:
            sock.sendall(partial)
            time.sleep(0.02)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends a reset
    time.sleep(0.3)
    still_serves(server)
    assert "Traceback" not in capfd.readouterr().err
    assert all(r.exc_info is None for r in caplog.records)
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) <= 9


@pytest.mark.parametrize("stream", [False, True])
def test_a_half_closed_client_gets_its_whole_answer(serve, stream):
    server = serve()
    body = json.dumps(dict(GOOD, max_tokens=20, stream=stream)).encode()
    with connect(server) as sock:
        sock.sendall(post(b"Content-Length: %d\r\n\r\n%s" % (len(body), body)))
        sock.shutdown(socket.SHUT_WR)  # done sending; still reading
        reply = read_all(sock)
    assert server.scheduler.finished["cancelled"] == 0
    if stream:
        assert reply.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in reply
    else:
        head, _, rest = reply.partition(b"\r\n\r\n")
        assert head == b"HTTP/1.1 100 Continue"  # the probe, which HTTP/1.1 clients skip
        assert rest.startswith(b"HTTP/1.1 200")
        assert json.loads(rest.partition(b"\r\n\r\n")[2])["usage"]["completion_tokens"] == 20


def test_message_fields_left_null_are_accepted(serve):
    """The official client's message objects, sent back as history, carry their unset fields as null."""
    server = serve()
    history = [{"role": "user", "content": "Hi", "name": None},
               {"role": "assistant", "content": "Hello", "refusal": None, "tool_calls": None, "audio": None},
               {"role": "user", "content": "Bye"}]
    r = requests.post(server.url + "/v1/chat/completions", json=dict(GOOD, messages=history), timeout=DEADLINE)
    assert r.status_code == 200
