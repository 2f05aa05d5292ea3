"""`minisft judge` never loses scores: the scores file is saved as scoring goes, a re-run
continues where the last one stopped and never leaves fewer scores, replies of any shape are a counted
failure, a hung server times out, an /api/tags of the wrong shape is named. A fake Ollama server on
127.0.0.1 answers each model response as the test scripts it."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import minisft.judge
from minisft.cli import main
from minisft.judge import entry_key


class Fake(BaseHTTPRequestHandler):
    """POST /api/chat: the reply for the quoted model response, from server.script[response] (a list, one
    item per request, the last repeated): a str is a score reply; "DROP" hangs up; "HANG" says nothing
    for 5 s; "ENDLESS" streams lines that never say done; "DRIP" sends a reply a byte every 50 ms;
    any other JSON value is sent as message.content. GET /api/tags: server.tags."""
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):
        pass

    def send(self, status, body: bytes):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        tags = self.server.tags
        self.send(200, tags if isinstance(tags, bytes) else json.dumps(tags).encode())

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        key = req["messages"][0]["content"].split("score the model response `")[1].split("`")[0]
        self.server.asked.append(key)
        plan = self.server.script[key]
        reply = plan.pop(0) if len(plan) > 1 else plan[0]
        if reply == "DROP":
            self.connection.close()
            return
        if reply == "HANG":
            time.sleep(5)
            return
        lines = [{"message": {"role": "assistant", "content": reply}, "done": False},
                 {"message": {"role": "assistant", "content": ""}, "done": True}]
        if reply in ("ENDLESS", "DRIP"):
            self.send_response(200)
            self.end_headers()   # no length: the reply runs until the connection closes
            line = (json.dumps(lines[0]) + "\n").encode()
            try:
                for _ in range(100_000):
                    if reply == "DRIP":
                        for byte in line:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(0.05)
                    else:
                        self.wfile.write(line * 100)
            except OSError:  # the judge hung up: what the test wants
                pass
            return
        self.send(200, "".join(json.dumps(m) + "\n" for m in lines).encode())


@pytest.fixture
def fake():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Fake)
    srv.daemon_threads = True
    srv.asked, srv.script, srv.tags = [], {}, {"models": [{"name": "llama3:latest"}]}
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def entries_file(tmp_path, n=4):
    entries = [{"instruction": f"Task {i}.", "input": "", "output": f"Answer {i}.", "model_response": f"r{i}"}
               for i in range(n)]
    (tmp_path / "responses.json").write_text(json.dumps(entries))
    return entries


def judge(fake, tmp_path, capsys, *more):
    code = main(["judge", "--responses", str(tmp_path / "responses.json"), "--url", fake.url,
                 "--out", str(tmp_path / "scores.json"), *more])
    out, err = capsys.readouterr()
    return code, out, err


def scores(tmp_path):
    return [(r["index"], r["score"]) for r in json.loads((tmp_path / "scores.json").read_text())]


def test_a_rerun_continues_where_a_dropped_connection_stopped(fake, tmp_path, capsys):
    entries_file(tmp_path)
    fake.script = {"r0": ["80"], "r1": ["70"], "r2": ["DROP", "60"], "r3": ["50"]}
    code, _, err = judge(fake, tmp_path, capsys)
    assert code == 1 and "the server failed at entry 2" in err and "run the same command again" in err
    assert scores(tmp_path) == [(0, 80), (1, 70)]
    code, out, _ = judge(fake, tmp_path, capsys)
    assert code == 0 and "continuing" in out and "2 of 4 entries are scored already" in out
    assert scores(tmp_path) == [(0, 80), (1, 70), (2, 60), (3, 50)]
    assert fake.asked == ["r0", "r1", "r2", "r2", "r3"]  # nothing scored twice
    assert sorted(p.name for p in tmp_path.iterdir()) == ["responses.json", "scores.json"]  # no temp file


def test_a_failing_rerun_never_replaces_good_scores(fake, tmp_path, capsys):
    entries_file(tmp_path)
    fake.script = {k: ["90"] for k in ("r0", "r1", "r2", "r3")}
    assert judge(fake, tmp_path, capsys)[0] == 0
    before = (tmp_path / "scores.json").read_bytes()
    fake.tags = b"<html>maintenance</html>"  # the server now answers junk
    code, _, err = judge(fake, tmp_path, capsys)
    assert code == 2 and "/api/tags did not answer JSON" in err
    fake.tags = ["llama3"]  # ... or JSON of the wrong shape
    code, _, err = judge(fake, tmp_path, capsys)
    assert code == 2 and "/api/tags answered \"['llama3']\", not Ollama's" in err
    assert (tmp_path / "scores.json").read_bytes() == before


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_ctrl_c_or_a_crash_mid_run_keeps_what_was_scored(fake, tmp_path, capsys, monkeypatch, interrupt):
    entries_file(tmp_path)
    fake.script = {k: ["75"] for k in ("r0", "r1", "r2", "r3")}
    real, calls = minisft.judge.query_model, []

    def third_is_interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise interrupt("stop")
        return real(*a, **k)
    monkeypatch.setattr(minisft.judge, "query_model", third_is_interrupted)
    if interrupt is KeyboardInterrupt:
        code, _, err = judge(fake, tmp_path, capsys)
        assert code == 130 and "the scores so far are saved" in err
    else:
        with pytest.raises(RuntimeError):
            judge(fake, tmp_path, capsys)
    assert scores(tmp_path) == [(0, 75), (1, 75)]


def test_a_reply_of_any_shape_is_a_counted_listed_failure_tried_again(fake, tmp_path, capsys):
    entries_file(tmp_path)
    fake.script = {"r0": ["80"], "r1": [42, "65"], "r2": [{"x": 1}, "55"], "r3": [None, "45"]}
    code, out, _ = judge(fake, tmp_path, capsys)
    assert code == 0 and "3 replies had a shape no Ollama server sends" in out
    assert 'entry 1: message {"role": "assistant", "content": 42} has no text content' in out
    assert "Number of scores: 1 of 4" in out
    code, out, _ = judge(fake, tmp_path, capsys)
    assert code == 0 and "Number of scores: 4 of 4" in out
    assert scores(tmp_path) == [(0, 80), (1, 65), (2, 55), (3, 45)]


def test_a_hung_server_times_out_with_the_scores_kept(fake, tmp_path, capsys):
    entries_file(tmp_path, 2)
    fake.script = {"r0": ["80"], "r1": ["HANG"]}
    code, _, err = judge(fake, tmp_path, capsys, "--timeout", "0.3")
    assert code == 1 and "the server failed at entry 1: ReadTimeout" in err
    assert scores(tmp_path) == [(0, 80)]


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_bad_timeout_is_refused(fake, tmp_path, capsys, value):
    entries_file(tmp_path)
    code, _, err = judge(fake, tmp_path, capsys, f"--timeout={value}")
    assert code == 2 and "--timeout must be a positive number of seconds" in err and not fake.asked


def test_the_scores_of_other_responses_are_refused_not_mixed(fake, tmp_path, capsys):
    entries = entries_file(tmp_path)
    other = [{"index": 0, "key": entry_key({**entries[0], "model_response": "else"}), "judge": "llama3", "score": 10,
              "reply": "10"}]
    (tmp_path / "scores.json").write_text(json.dumps(other))
    code, _, err = judge(fake, tmp_path, capsys)
    assert code == 2 and f"{tmp_path / 'scores.json'}: result 0 scores another entry 0" in err
    assert json.loads((tmp_path / "scores.json").read_text()) == other and not fake.asked


def test_scores_of_another_judge_or_a_repeated_entry_are_refused_and_the_file_kept(fake, tmp_path, capsys):
    entries_file(tmp_path)
    fake.script = {"r0": ["80"], "r1": ["DROP"]}
    assert judge(fake, tmp_path, capsys)[0] == 1  # entry 0 scored by llama3, then the server failed
    fake.tags = {"models": [{"name": "llama3:latest"}, {"name": "mistral:latest"}]}
    path, before = tmp_path / "scores.json", (tmp_path / "scores.json").read_bytes()
    code, _, err = judge(fake, tmp_path, capsys, "--model", "mistral")
    assert code == 2 and "result 0 was scored by judge 'llama3', not --model 'mistral'" in err
    first = json.loads(before)[0]
    for bad, said in [([first, first], "results 0 and 1 both score entry 0"),
                      ([{k: v for k, v in first.items() if k != "judge"}], "result 0 was scored by judge None")]:
        path.write_text(json.dumps(bad))
        code, _, err = judge(fake, tmp_path, capsys)
        assert code == 2 and said in err and err.count("\n") == 1
        assert json.loads(path.read_text()) == bad
    path.write_bytes(before)
    fake.script = {"r1": ["70"], "r2": ["60"], "r3": ["50"]}
    code, out, _ = judge(fake, tmp_path, capsys, "--model", "llama3:latest")  # the same judge by its full name
    assert code == 0 and "Number of scores: 4 of 4" in out


@pytest.mark.parametrize("reply, said", [
    ("ENDLESS", "the reply passed 1048576 bytes without ending"),  # a stream that never says done
    ("DRIP", "the reply took longer than --timeout (0.5 s)"),     # a byte every 50 ms: never a read timeout
])
def test_a_reply_is_bounded_in_size_and_in_total_time(fake, tmp_path, capsys, reply, said):
    entries_file(tmp_path, 2)
    fake.script = {"r0": [reply], "r1": ["80"]}
    start = time.monotonic()
    code, out, err = judge(fake, tmp_path, capsys, "--timeout", "0.5")
    assert time.monotonic() - start < 5
    assert said in out + err


@pytest.mark.parametrize("url", ["htp://x", "localhost:11434", "http://", "ftp://host/"])
def test_a_url_that_is_no_http_address_is_named(fake, tmp_path, capsys, url):
    entries_file(tmp_path)
    code, _, err = judge_at(url, tmp_path, capsys)
    assert code == 2 and "--url must be an http:// or https:// address with a host" in err and repr(url) in err
    assert "did not answer JSON" not in err and not (tmp_path / "scores.json").exists()


def judge_at(url, tmp_path, capsys):
    code = main(["judge", "--responses", str(tmp_path / "responses.json"), "--url", url,
                 "--out", str(tmp_path / "scores.json")])
    out, err = capsys.readouterr()
    return code, out, err
