"""`minisft serve`: the OpenAI API as the official client sees it, continuous batching, errors, auth.

The model is gpt2-tiny with random weights in float64 (so batched and one-at-a-time decoding agree
to ~1e-15 and greedy choices cannot flip between them); greedy outputs are compared exactly."""
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import openai
import pytest
import requests

from minisft import GPT, GPTConfig, tokenizer
from minisft.batch import pack_sequences
from minisft.checkpoint import save_checkpoint
from minisft.generate import generate
from minisft.prompts import get_style
from minisft.scheduler import Job, Scheduler
from minisft.serve import Server, kv_cache_bytes
from tests.helpers import ALL_BACKENDS, backend_or_skip
from tests.cdp import CHROMIUM, Browser
from tests.conftest import ROOT

NAME = "tiny"
STYLE = get_style("alpaca")
QUESTIONS = ["Name a color.", "What is the capital of France?", "Rewrite: the cat sat.", "Give a synonym of fast."]
DEADLINE = 60  # seconds before a test gives up waiting (a hang, not a timing check)


@pytest.fixture(scope="module")
def model():
    return GPT(GPTConfig.preset("gpt2-tiny"), dtype="float64", seed=7)


@pytest.fixture(scope="module")
def server(model):
    s = Server(model, STYLE, port=0, model_name=NAME)
    threading.Thread(target=s.serve_forever, daemon=True).start()
    yield s
    s.close()


def client(server, key="unused"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=DEADLINE)


def user(text):
    return [{"role": "user", "content": text}]


def greedy(model, text, n):
    """What the engine's own generate() answers, one prompt alone: the reference."""
    return tokenizer.decode(generate(model, [tokenizer.encode(STYLE.prompt(user(text)))], n)[0])


def stream_text(stream):
    parts, finish = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(parts), finish


# ---- the engine under the server -------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_kv_cache_extend_matches_a_fresh_prefill(backend):
    backend_or_skip(backend, "float64")
    model = GPT(GPTConfig.preset("gpt2-tiny"), backend=backend, dtype="float64", seed=7)
    rng = np.random.default_rng(0)
    a, b = [rng.integers(0, 50257, n).tolist() for n in (9, 5)]
    cache = model.kv_cache(1, 32)
    model.prefill(cache, pack_sequences([a]))
    model.decode(cache, [7])
    joined = model.kv_cache_extend(cache, pack_sequences([b]))               # b joins a running cache
    fresh = model.kv_cache(1, 32)
    assert np.allclose(joined, model.prefill(fresh, pack_sequences([b])), rtol=0, atol=1e-12)
    both = model.decode(cache, [11, 13])                                       # (2, V)
    alone_a = model.logits_last(pack_sequences([a + [7, 11]]))
    assert np.allclose(both, np.concatenate([alone_a, model.decode(fresh, [13])]), rtol=0, atol=1e-12)


# Every backend in every dtype it has (the numpy reference has no bfloat16).
KV_CASES = [(b, d) for b in ALL_BACKENDS for d in ("float32", "float64", "bfloat16") if (b, d) != ("numpy", "bfloat16")]


@pytest.mark.parametrize("backend,dtype", KV_CASES)
def test_the_printed_kv_cache_size_is_the_bytes_the_backend_allocates(backend, dtype):
    try:
        B = backend_or_skip(backend, dtype)
    except ValueError as e:  # bfloat16 on a CPU without bf16 units
        pytest.skip(str(e))
    model = GPT(GPTConfig.preset("gpt2-tiny"), backend=B, dtype=dtype, seed=0)
    cache = model.kv_cache(3, model.cfg.context_length)
    arrays = [a for layer in cache.layers for a in layer]
    allocated = sum(a.nbytes for a in arrays)  # numpy arrays and torch tensors alike
    assert kv_cache_bytes(model, 3) == allocated


def job(text, n, **kw):
    return Job(tokenizer.encode(STYLE.prompt(user(text))), n, tokenizer.decode, **kw)


def test_waiting_jobs_are_decoded_in_one_batch_each_as_if_alone(model):
    sched = Scheduler(model, max_batch=4)
    lengths = [12, 3, 8, 5]  # they leave the batch at different steps
    jobs = [sched.submit(job(q, n)) for q, n in zip(QUESTIONS, lengths)]
    while any(j.finish_reason is None for j in jobs):
        sched.step()
    assert sched.peak_batch == 4
    for j, q, n in zip(jobs, QUESTIONS, lengths):
        assert tokenizer.decode(j.tokens) == greedy(model, q, n) and j.finish_reason == "length"


def test_a_job_joining_mid_flight_and_one_cancelled_leave_the_others_exact(model):
    sched = Scheduler(model, max_batch=3)
    first, dropped = sched.submit(job(QUESTIONS[0], 15)), sched.submit(job(QUESTIONS[3], 15))
    for _ in range(4):
        sched.step()
    late = sched.submit(job(QUESTIONS[1], 6))
    sched.step()
    dropped.cancel()
    while first.finish_reason is None or late.finish_reason is None:
        sched.step()
    assert sched.peak_batch == 3 and dropped.finish_reason == "cancelled" and len(dropped.tokens) < 15
    assert tokenizer.decode(first.tokens) == greedy(model, QUESTIONS[0], 15)
    assert tokenizer.decode(late.tokens) == greedy(model, QUESTIONS[1], 6)


# ---- the command line against `minisft generate` ----------------------------------------------------------
def test_cli_chat_completions_equal_minisft_generate_greedy(model, tmp_path):
    ckpt, data, out = tmp_path / "model.h5", tmp_path / "data.json", tmp_path / "responses.json"
    save_checkpoint(ckpt, model)
    data.write_text(json.dumps([{"instruction": q, "input": "", "output": "-"} for q in QUESTIONS[:3]]))
    cli = [sys.executable, "-m", "minisft"]
    r = subprocess.run(cli + ["generate", "--checkpoint", ckpt, "--data", data, "--split", "all", "--max-new-tokens",
                              "10", "--out", out], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen(cli + ["serve", "--checkpoint", ckpt, "--port", "0", "--name", NAME], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            url = re.search(r"(http://\S+)/v1", proc.stdout.readline()).group(1)
            c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=DEADLINE)
            for entry in json.loads(out.read_text()):
                msgs = user(entry["instruction"])
                reply = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0)
                text = reply.choices[0].message.content
                assert text.strip() == entry["model_response"]  # generate strips the response it writes
                streamed, finish = stream_text(c.chat.completions.create(model=NAME, messages=msgs, max_tokens=10,
                                                                         temperature=0, stream=True))
                assert streamed == text and finish == reply.choices[0].finish_reason == "length"
        finally:
            proc.terminate()
            proc.wait(DEADLINE)


def readme_serve_examples():
    """From README.md's serving section: the serve command the examples go with (the first
    `minisft serve --checkpoint CKPT` line), the curl commands, and the openai-client snippet."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Serving"):]
    section = section[:section.index("\n### ", 1)]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.DOTALL)
    serve = next(line for kind, body in blocks for line in body.splitlines()
                 if line.startswith("minisft serve --checkpoint CKPT"))
    curls = [c.strip() for kind, body in blocks if "curl " in body for c in re.split(r"\n(?=curl )", body)]
    python = next(body for kind, body in blocks if kind == "python" and "OpenAI(" in body)
    return shlex.split(serve, comments=True), curls, python


def test_the_readmes_serve_examples_run_as_written(model, tmp_path):
    serve, curls, python = readme_serve_examples()
    assert len(curls) == 2
    ckpt = tmp_path / "step-000232.h5"  # CKPT is a training run's checkpoint: named as finetune names them
    save_checkpoint(ckpt, model)
    argv = [ckpt if a == "CKPT" else a for a in serve[1:]]
    # Any free port (8000 may be taken), and the numpy engine: no numba compile for a tiny model.
    cmd = [sys.executable, "-m", "minisft", *map(str, argv), "--port", "0", "--backend", "numpy"]
    env = {**os.environ, "NO_PROXY": "127.0.0.1"}
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            url = re.search(r"(http://\S+)/v1", proc.stdout.readline()).group(1)

            def run(*command):
                r = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE, env=env, check=False)
                assert r.returncode == 0, (command, r.stderr)
                return r.stdout
            whole = json.loads(run("bash", "-c", curls[0].replace("http://127.0.0.1:8000", url)))
            assert "error" not in whole and whole["choices"][0]["message"]["role"] == "assistant", whole
            events = run("bash", "-c", curls[1].replace("http://127.0.0.1:8000", url)).split("\n\n")
            assert events[-2] == "data: [DONE]" and all('"error"' not in e for e in events), events
            run(sys.executable, "-c", python.replace("http://127.0.0.1:8000", url))  # a 404 raises
        finally:
            proc.terminate()
            proc.wait(DEADLINE)


@pytest.mark.parametrize("flag,value", [("--port", "70000"), ("--max-batch", "0"), ("--api-key", ""),
                                        ("--temperature", "2.5")])
def test_cli_refuses_a_bad_setting_in_one_line_before_loading(flag, value, tmp_path):
    r = subprocess.run([sys.executable, "-m", "minisft", "serve", "--checkpoint", tmp_path / "absent.h5", flag, value],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and flag in r.stderr


def test_cli_refuses_a_top_k_past_the_models_vocabulary_before_listening(model, tmp_path):
    """The vocabulary is the loaded model's (GPT-2's 50257, a Llama-family model's own)."""
    model.save_pretrained(tmp_path / "m")
    r = subprocess.run([sys.executable, "-m", "minisft", "serve", "--weights", tmp_path / "m", "--top-k",
                        str(model.cfg.vocab_size + 1), "--port", "0"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--top-k" in r.stderr and "serving" not in r.stdout


# ---- the API ------------------------------------------------------------------------------------------
def test_chat_completion_reports_usage_and_the_models_list_names_the_model(server, model):
    c = client(server)
    reply = c.chat.completions.create(model=NAME, messages=user(QUESTIONS[0]), max_tokens=7, temperature=0)
    n_prompt = len(tokenizer.encode(STYLE.prompt(user(QUESTIONS[0]))))
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == greedy(model, QUESTIONS[0], 7)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (n_prompt, 7,
                                                                                                   n_prompt + 7)
    assert [m.id for m in c.models.list()] == [NAME] and c.models.retrieve(NAME).owned_by == "minisft"


def test_streaming_ends_with_done_and_reports_usage_when_asked(server, model):
    r = requests.post(server.url + "/v1/chat/completions", stream=True, timeout=DEADLINE, json=dict(
        model=NAME, messages=user(QUESTIONS[1]), max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert r.status_code == 200 and r.headers["Content-Type"] == "text/event-stream"
    events = [line[len("data: "):] for line in r.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == greedy(model, QUESTIONS[1], 5)


def test_completions_take_raw_text_or_token_ids(server, model):
    c = client(server)
    ids = tokenizer.encode("The sky is")
    expected = tokenizer.decode(generate(model, [ids], 6)[0])
    by_text = c.completions.create(model=NAME, prompt="The sky is", max_tokens=6, temperature=0)
    by_ids = c.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0, echo=True)
    assert by_text.choices[0].text == expected and by_text.usage.prompt_tokens == len(ids)
    assert by_ids.choices[0].text == "The sky is" + expected
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=NAME, prompt="The sky is", max_tokens=6, temperature=0, stream=True))
    assert streamed == expected


def test_a_stop_string_cuts_the_text_where_it_begins(server, model):
    full = greedy(model, QUESTIONS[2], 20)
    stop = full[7:11]  # likely spans a token boundary; the text must end just before its first occurrence
    c = client(server)
    reply = c.chat.completions.create(model=NAME, messages=user(QUESTIONS[2]), max_tokens=20, temperature=0,
                                      stop=[stop, "never appears \u2603"])
    assert reply.choices[0].message.content == full[:full.index(stop)] and reply.choices[0].finish_reason == "stop"
    streamed, finish = stream_text(c.chat.completions.create(
        model=NAME, messages=user(QUESTIONS[2]), max_tokens=20, temperature=0, stop=stop, stream=True))
    assert streamed == full[:full.index(stop)] and finish == "stop"


def test_sampling_with_a_seed_is_reproducible(server):
    c = client(server)
    ask = lambda seed: c.chat.completions.create(model=NAME, messages=user(QUESTIONS[0]), max_tokens=8,  # noqa: E731
                                                 temperature=1.0, top_p=0.9, seed=seed).choices[0].message.content
    assert ask(5) == ask(5) != ask(6)


def _streams(server, prompts, lengths, drop=None):
    """Streaming requests, all at once from threads -> their texts; the one at index drop reads two
    chunks and closes its connection."""
    texts, start = [None] * len(prompts), threading.Barrier(len(prompts))

    def one(i):
        c = client(server)
        start.wait()
        stream = c.chat.completions.create(model=NAME, messages=user(prompts[i]), max_tokens=lengths[i],
                                           temperature=0, stream=True)
        if i == drop:
            for _, _ in zip(range(2), stream):
                pass
            stream.response.close()
            return
        texts[i] = stream_text(stream)[0]
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    return texts


def test_four_concurrent_streams_complete_and_equal_their_sequential_results(server, model):
    lengths = [16, 9, 12, 5]
    c = client(server)
    sequential = [stream_text(c.chat.completions.create(model=NAME, messages=user(q), max_tokens=n, temperature=0,
                                                        stream=True))[0] for q, n in zip(QUESTIONS, lengths)]
    assert _streams(server, QUESTIONS, lengths) == sequential
    assert sequential == [greedy(model, q, n) for q, n in zip(QUESTIONS, lengths)]


def test_a_dropped_client_frees_its_slot_and_the_others_finish(server, model):
    lengths = [10, 10, 10, 200]  # the fourth would run on long after the others
    cancelled = server.scheduler.finished["cancelled"]
    texts = _streams(server, QUESTIONS, lengths, drop=3)
    assert texts[:3] == [greedy(model, q, n) for q, n in zip(QUESTIONS[:3], lengths[:3])]
    deadline = time.monotonic() + DEADLINE
    while server.scheduler.finished["cancelled"] == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.scheduler.finished["cancelled"] == cancelled + 1


def test_a_client_that_disconnects_while_waiting_for_a_whole_answer_is_cancelled(server):
    cancelled = server.scheduler.finished["cancelled"]
    body = json.dumps(dict(GOOD, max_tokens=200)).encode()
    with socket.create_connection(server.server_address[:2]) as sock:  # send the request, then hang up
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.monotonic() + DEADLINE
    while server.scheduler.finished["cancelled"] == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.scheduler.finished["cancelled"] == cancelled + 1


# ---- bad requests: OpenAI's error objects, 4xx, and the server goes on ------------------------------------
GOOD = dict(model=NAME, messages=user("Hi"), max_tokens=2)
BAD = [
    ("malformed JSON", "/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, "invalid_json"),
    ("body not an object", "/v1/chat/completions", [1, 2], 400, None),
    ("unknown field", "/v1/chat/completions", dict(GOOD, temprature=0.5), 400, "unknown_parameter"),
    ("max_tokens a string", "/v1/chat/completions", dict(GOOD, max_tokens="5"), 400, "invalid_type"),
    ("temperature a boolean", "/v1/chat/completions", dict(GOOD, temperature=True), 400, "invalid_type"),
    ("max_tokens 0", "/v1/chat/completions", dict(GOOD, max_tokens=0), 400, "invalid_value"),
    ("max_tokens negative", "/v1/completions", dict(model=NAME, prompt="x", max_tokens=-3), 400, "invalid_value"),
    ("temperature above 2", "/v1/chat/completions", dict(GOOD, temperature=2.5), 400, "invalid_value"),
    ("top_p 0", "/v1/chat/completions", dict(GOOD, top_p=0), 400, "invalid_value"),
    ("prompt longer than the context", "/v1/completions", dict(model=NAME, prompt=[5] * 300), 400,
     "context_length_exceeded"),
    ("prompt plus max_tokens beyond it", "/v1/chat/completions", dict(GOOD, max_tokens=250), 400,
     "context_length_exceeded"),
    ("unknown model", "/v1/chat/completions", dict(GOOD, model="gpt-4o"), 404, "model_not_found"),
    ("no model", "/v1/completions", dict(prompt="x"), 400, "missing_required_parameter"),
    ("no messages", "/v1/chat/completions", dict(model=NAME), 400, "missing_required_parameter"),
    ("a message without a role", "/v1/chat/completions", dict(GOOD, messages=[{"content": "x"}]), 400, None),
    ("ends with the assistant", "/v1/chat/completions",
     dict(GOOD, messages=user("x") + [{"role": "assistant", "content": "y"}]), 400, None),
    ("n above 1", "/v1/chat/completions", dict(GOOD, n=2), 400, "unsupported_value"),
    ("a negative seed", "/v1/chat/completions", dict(GOOD, seed=-1), 400, "invalid_value"),
    ("an empty stop string", "/v1/chat/completions", dict(GOOD, stop=""), 400, "invalid_value"),
    ("five stop strings", "/v1/chat/completions", dict(GOOD, stop=list("abcde")), 400, "invalid_value"),
    ("a token id outside the vocabulary", "/v1/completions", dict(model=NAME, prompt=[50257]), 400, "invalid_value"),
    ("stream_options without stream", "/v1/chat/completions", dict(GOOD, stream_options={"include_usage": True}),
     400, "invalid_value"),
    ("unknown route", "/v1/embeddings", dict(model=NAME, input="x"), 404, "not_found"),
    ("a message with a name", "/v1/chat/completions",
     dict(GOOD, messages=[{"role": "user", "content": "x", "name": "bob"}]), 400, "unsupported_value"),
    ("a message with tool calls", "/v1/chat/completions",
     dict(GOOD, messages=[{"role": "user", "content": "x", "tool_calls": []}]), 400, "unsupported_value"),
    ("a stop string of 257 characters", "/v1/chat/completions", dict(GOOD, stop="x" * 257), 400, "invalid_value"),
    ("a million-character stop string", "/v1/chat/completions", dict(GOOD, stop=["x" * 10**6]), 400,
     "invalid_value"),
    ("JSON nested 100000 deep", "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
    ("JSON nested 100 deep", "/v1/chat/completions",
     json.dumps(GOOD)[:-1].encode() + b', "user": ' + b"[" * 100 + b"]" * 100 + b"}", 400, "invalid_json"),
    ("a 5000-digit integer", "/v1/chat/completions", b'{"model": "tiny", "max_tokens": ' + b"7" * 5000 + b"}", 400,
     "invalid_json"),
]


@pytest.mark.parametrize("what,path,body,status,code", BAD, ids=[b[0] for b in BAD])
def test_a_bad_request_gets_an_openai_error_and_the_server_goes_on(server, what, path, body, status, code):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = requests.post(server.url + path, data=data, headers={"Content-Type": "application/json"}, timeout=DEADLINE)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]
    ok = requests.post(server.url + "/v1/chat/completions", json=GOOD, timeout=DEADLINE)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_the_api_key_is_required_as_a_bearer_token(model):
    s = Server(model, STYLE, port=0, model_name=NAME, api_key="sekret")
    threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        with pytest.raises(openai.AuthenticationError):
            client(s, "wrong").chat.completions.create(model=NAME, messages=user("Hi"), max_tokens=2)
        no_key = requests.post(s.url + "/v1/chat/completions", json=GOOD, timeout=DEADLINE)
        assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
        assert requests.get(s.url + "/v1/models", timeout=DEADLINE).status_code == 401
        reply = client(s, "sekret").chat.completions.create(model=NAME, messages=user("Hi"), max_tokens=2)
        assert reply.usage.completion_tokens == 2
        assert requests.get(s.url + "/", timeout=DEADLINE).status_code == 200  # the page holds no secret
    finally:
        s.close()


# ---- the chat page in a real browser ------------------------------------------------------------------
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing: apt-get install chromium "
                    "to drive the chat page in a headless browser")
def test_chat_page_streams_a_conversation_and_clears_it_in_headless_chromium(server, model, tmp_path):
    browser = Browser(tmp_path / "profile")
    try:
        browser.open(server.url + "/")
        browser.wait_for(f"document.getElementById('model')?.textContent === {json.dumps(NAME)}")

        def say(text):  # type a message, send it, wait until its reply has streamed in
            browser.eval(f"document.getElementById('input').value = {json.dumps(text)};"
                         "document.getElementById('form').requestSubmit()")
            browser.wait_for("document.body.dataset.state === 'idle'")
            return browser.eval("[...document.querySelectorAll('.msg')].map(m => [m.className, m.textContent])")

        browser.eval("document.getElementById('temperature').value = '0';"
                     "document.getElementById('max_tokens').value = '6'")
        first = say(QUESTIONS[0])
        assert first == [["msg user", QUESTIONS[0]], ["msg assistant", greedy(model, QUESTIONS[0], 6)]]
        second = say(QUESTIONS[1])  # the page sends the whole conversation
        conversation = user(QUESTIONS[0]) + [{"role": "assistant", "content": first[1][1]}] + user(QUESTIONS[1])
        expected = tokenizer.decode(generate(model, [tokenizer.encode(STYLE.prompt(conversation))], 6)[0])
        assert second[2:] == [["msg user", QUESTIONS[1]], ["msg assistant", expected]]
        png = browser.screenshot(tmp_path / "chat.png")
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[16:24] == (900).to_bytes(4, "big") + (640).to_bytes(4, "big")
        browser.eval("document.getElementById('clear').click()")
        assert browser.eval("document.querySelectorAll('.msg').length") == 0
        assert say(QUESTIONS[1])[1] == ["msg assistant", greedy(model, QUESTIONS[1], 6)]  # a fresh conversation
    finally:
        browser.close()
