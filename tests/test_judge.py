"""`minisft judge` against a fake Ollama server on 127.0.0.1 (a thread): replies streamed as JSON lines
with HTTP/1.1 chunked transfer, cut at arbitrary bytes, with junk lines mixed in, and a connection
dropped mid-reply; the server being down; the score parser on the replies judges actually give."""
import json
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from minisft.cli import main
from minisft.judge import entry_key, format_input, load_responses, parse_score, score_prompt
from tests.conftest import ROOT


@pytest.mark.parametrize("reply, score", [
    ("85", 85), (" 85.\n", 85), ("0", 0), ("100", 100), ("Score: 40", 40), ("score of 77", 77),
    ("I'd rate it 95 out of 100.", 95), ("70/100", 70), ("100/100", 100), ("88.0", 88), ("85%", 85),
    ("Score: 85\n\nThe response covers 3 of the 4 points.", 85),
    ("92 out of 100: it misses 2 details.", 92),
    ("On a scale from 0 to 100, I would give it 60.", 60),
    ("On a 0-100 scale: 35", 35),
    ("150", None), ("-5", None), ("101/100", None), ("85.5", None), ("Score: 120", None),
    ("I would give it 80 or 90.", None), ("seventy", None), ("", None), ("N/A", None),
    ("Score: 80. Score: 90.", None),
])
def test_parse_score(reply, score):
    assert parse_score(reply) == score


def test_the_books_prompt():
    e = {"instruction": "Rewrite the sentence.", "input": "It is fast.", "output": "It is quick.",
         "model_response": "It is rapid."}
    assert score_prompt(e) == (
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nRewrite the sentence.\n\n### Input:\nIt is fast.` and "
        "correct output `It is quick.`, score the model response `It is rapid.` on a scale from 0 to 100, "
        "where 100 is the best score. Respond with the integer number only.")
    assert format_input({**e, "input": ""}).endswith("### Instruction:\nRewrite the sentence.")


# ---- the fake server ------------------------------------------------------------------------------------
# What the fake judge answers, keyed by the model response quoted in the prompt.
REPLIES = {
    "r0": ["85"],
    "r1": ["Sc", "ore", ": 4", "0"],                 # a reply in pieces, with junk lines between
    "r2": ["I'd rate it 95 ", "out of 100."],
    "r3": ["banana"],
    "r4": ["70", "/100"],
    "r5": ["150"],
    "drop": ["9"],                                   # the connection dies halfway through
}


class FakeOllama(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # chunked transfer needs 1.1
    models = ["llama3:latest"]

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = json.dumps({"models": [{"name": m} for m in self.models]}).encode()
        self.send_response(200 if self.path == "/api/tags" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def chunk(self, data: bytes):
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, req))
        key = re.search(r"score the model response `(.*)` on a scale", req["messages"][0]["content"], re.S)[1]
        lines = [json.dumps({"model": req["model"], "message": {"role": "assistant", "content": p}, "done": False})
                 for p in REPLIES[key]]
        lines.append(json.dumps({"model": req["model"], "message": {"role": "assistant", "content": ""},
                                 "done": True, "total_duration": 1}))
        if key == "r1":
            lines[1:1] = ["this is not json", "", "[1, 2]"]
        stream = ("\n".join(lines) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if key == "drop":
            self.chunk(stream[:20])
            self.connection.shutdown(socket.SHUT_RDWR)   # no final chunk: the reply is cut off
            self.close_connection = True
            return
        for a in range(0, len(stream), 7):               # 7-byte chunks: lines split across chunks
            self.chunk(stream[a:a + 7])
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeOllama)
    srv.requests = []
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def write_entries(path, responses):
    entries = [{"instruction": f"Task {i}.", "input": "x" if i % 2 else "", "output": f"Answer {i}.",
                "model_response": r} for i, r in enumerate(responses)]
    path.write_text(json.dumps(entries))
    return entries


def test_judge_scores_streamed_replies(server, tmp_path, capsys):
    srv, url = server
    entries = write_entries(tmp_path / "responses.json", ["r0", "r1", "r2", "r3", "r4", "r5"])
    out = tmp_path / "scores.json"
    code = main(["judge", "--responses", str(tmp_path / "responses.json"), "--url", url, "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "Number of scores: 4 of 6" in printed
    assert "Average score: 72.50" in printed                   # (85 + 40 + 95 + 70) / 4
    assert "2 replies had no score" in printed and "entry 3: 'banana'" in printed and "entry 5: '150'" in printed
    assert "skipped 2 lines" in printed                        # the two junk lines of reply r1
    saved = json.loads(out.read_text())
    assert [r.pop("key") for r in saved] == [entry_key(e) for e in entries]
    assert [r.pop("judge") for r in saved] == ["llama3"] * 6
    assert saved == [
        {"index": 0, "score": 85, "reply": "85"}, {"index": 1, "score": 40, "reply": "Score: 40"},
        {"index": 2, "score": 95, "reply": "I'd rate it 95 out of 100."},
        {"index": 3, "score": None, "reply": "banana"},
        {"index": 4, "score": 70, "reply": "70/100"}, {"index": 5, "score": None, "reply": "150"}]
    # The book's request, exactly.
    assert [p for p, _ in srv.requests] == ["/api/chat"] * 6
    for (_, req), e in zip(srv.requests, entries):
        assert req == {"model": "llama3", "messages": [{"role": "user", "content": score_prompt(e)}],
                       "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}}


def test_dropped_connection_keeps_the_finished_scores(server, tmp_path, capsys):
    _, url = server
    write_entries(tmp_path / "responses.json", ["r0", "r2", "drop", "r4"])
    out = tmp_path / "scores.json"
    code = main(["judge", "--responses", str(tmp_path / "responses.json"), "--url", url, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    assert "the server failed at entry 2:" in captured.err
    assert "Number of scores: 2 of 4" in captured.out and "Average score: 90.00" in captured.out
    assert [r["score"] for r in json.loads(out.read_text())] == [85, 95]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["responses.json", "scores.json"]  # no temp file left


def test_missing_model_is_named(server, tmp_path, capsys):
    _, url = server
    write_entries(tmp_path / "r.json", ["r0"])
    assert main(["judge", "--responses", str(tmp_path / "r.json"), "--url", url, "--model", "mistral"]) == 2
    err = capsys.readouterr().err
    assert "has no model 'mistral' (it has: llama3:latest)" in err and "ollama pull mistral" in err
    assert not (tmp_path / "r-scores.json").exists()


def test_server_down_is_a_clear_error(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()   # nothing listens on this port now
    write_entries(tmp_path / "r.json", ["r0"])
    p = subprocess.run([sys.executable, "-m", "minisft", "judge", "--responses", str(tmp_path / "r.json"),
                        "--url", f"http://127.0.0.1:{port}"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2
    assert f"cannot reach an Ollama server at http://127.0.0.1:{port}" in p.stderr and "ollama serve" in p.stderr
    assert "Traceback" not in p.stderr


def test_bad_responses_file_names_record_and_field(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b", "model_response": "c"},
                                {"instruction": "a", "input": "", "output": "b"}]))
    assert main(["judge", "--responses", str(path)]) == 2
    assert f"{path}: record 1: field 'model_response' is missing" in capsys.readouterr().err


def test_the_books_responses_file_loads(data_dir):
    """The real 110-entry file passes validation and gives the book's prompts."""
    entries = load_responses(data_dir / "instruction-data-with-response.json")
    assert len(entries) == 110
    assert score_prompt(entries[0]).startswith("Given the input `Below is an instruction that describes a task.")
    assert ("score the model response `The car is as fast as a bullet.` on a scale from 0 to 100"
            in score_prompt(entries[0]))


def test_judging_off_a_terminal_writes_plain_progress_lines(server, tmp_path, capsys, monkeypatch):
    """Captured stderr is no terminal (a log file, CI): plain lines, no tqdm bar's carriage returns."""
    import minisft.progress
    monkeypatch.setattr(minisft.progress, "PLAIN_EVERY_S", 0.0)  # a line at every update
    _, url = server
    write_entries(tmp_path / "responses.json", ["r0", "r1", "r2"])
    assert main(["judge", "--responses", str(tmp_path / "responses.json"), "--url", url,
                 "--out", str(tmp_path / "scores.json")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    # (the fake server's own logging of a client that closed its stream may share stderr: not ours)
    progress = [ln.split(" (")[0] for ln in err.splitlines() if ln.startswith("scoring")]
    assert progress == [f"scoring: {i}/3 entries" for i in (1, 2, 3)]
