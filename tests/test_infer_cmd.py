"""`minisft generate`, `chat` and `eval` on a checkpoint: the output formats and the numbers."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from minisft import GPT, GPTConfig, tokenizer
from minisft.checkpoint import save_checkpoint
from minisft.cli import main
from minisft.data import Loader, collate_examples, encode_records, load_records, split_dataset
from minisft.generate import generate
from minisft.prompts import get_style
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = GPT(GPTConfig.preset("gpt2-tiny"), seed=7)
    path = tmp_path_factory.mktemp("ckpt") / "model.h5"
    save_checkpoint(path, model)
    return path, model


def minisft(*argv, stdin=None):
    return subprocess.run([sys.executable, "-m", "minisft", *map(str, argv)], cwd=ROOT, capture_output=True,
                          text=True, input=stdin)


def test_generate_writes_the_books_response_format(ckpt, book_data, tmp_path):
    path, model = ckpt
    data = book_data
    out = tmp_path / "responses.json"
    r = minisft("generate", "--checkpoint", path, "--data", data, "--split", "test", "--limit", 3,
                "--max-new-tokens", 4, "--out", out)
    assert r.returncode == 0, r.stderr
    assert f"wrote 3 responses to {out}" in r.stdout
    entries = json.loads(out.read_text())
    raw = json.loads(data.read_text())[935:938]
    assert [{k: e[k] for k in raw[0]} for e in entries] == raw  # each test entry, with model_response added
    style = get_style("alpaca")
    records = split_dataset(load_records(data)).test
    for e, rec in zip(entries, records):  # greedy: what the engine generates for the prompt with header
        ids = generate(model, [tokenizer.encode(style.prompt(rec["messages"]))], 4)[0]
        assert e["model_response"] == tokenizer.decode(ids).strip()


def test_generate_book_prompt_mode(ckpt, book_data, tmp_path):
    path, model = ckpt
    out = tmp_path / "book.json"
    r = minisft("generate", "--checkpoint", path, "--data", book_data, "--limit", 1,
                "--max-new-tokens", 3, "--book-prompt", "--out", out)
    assert r.returncode == 0, r.stderr
    assert f"wrote 1 response to {out}" in r.stdout  # one response, not "1 responses"
    rec = split_dataset(load_records(book_data)).test[0]
    prompt = get_style("alpaca").format_input(rec["messages"])  # no response header: the book's prompt
    ids = tokenizer.encode(prompt)
    text = tokenizer.decode(ids + generate(model, [ids], 3)[0])
    assert json.loads(out.read_text())[0]["model_response"] == text[len(prompt):].replace("### Response:", "").strip()


def test_eval_reports_the_token_weighted_loss(ckpt, book_data):
    path, model = ckpt
    r = minisft("eval", "--checkpoint", path, "--data", book_data, "--split", "val", "--json",
                "--backend", "numpy")  # the same engine as the reference loop below: equal to 1e-12
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["model"] == f"checkpoint {path}" and result["split"] == "val"
    val = encode_records(split_dataset(load_records(book_data)).val)
    loss_sum, n = 0.0, 0
    for batch in Loader(val, 8, shuffle=False, drop_last=False, collate=collate_examples):
        s, k = model.loss(batch)
        loss_sum, n = loss_sum + s, n + k
    assert result["records"] == 55 and result["targets"] == n
    assert result["loss"] == pytest.approx(loss_sum / n, rel=1e-12)
    assert result["perplexity"] == pytest.approx(np.exp(loss_sum / n), rel=1e-12)


def test_eval_prints_a_readable_line_naming_the_model_and_the_split(ckpt, book_data):
    path, _ = ckpt
    r = minisft("eval", "--checkpoint", path, "--data", book_data, "--split", "test", "--backend", "numpy")
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"checkpoint {re.escape(str(path))}, test split \(110 records, \d+ targets\): "
                        r"loss \d+\.\d{4}, perplexity \d+\.\d\d", line), line


def test_eval_names_a_split_left_without_targets_and_no_other_failure(ckpt, book_data, monkeypatch, capsys):
    path, _ = ckpt
    argv = ["eval", "--checkpoint", str(path), "--data", str(book_data), "--backend", "numpy"]
    # One token per sequence, the prompt's: every target masked.
    assert main(argv + ["--max-length", "1", "--mask-prompt", "input"]) == 2
    assert "--max-length 1 with --mask-prompt input leaves no target to score in the val split" in \
        capsys.readouterr().err

    def broken(model, batches):
        raise ValueError("operands could not be broadcast together")
    monkeypatch.setattr("minisft.cli.eval.evaluate_loss", broken)
    with pytest.raises(ValueError, match="could not be broadcast"):  # a bug stays a bug, not "no target"
        main(argv)


def test_chat_answers_each_message_in_the_conversation_so_far_and_keeps_commands_from_the_model(ckpt):
    path, model = ckpt
    r = minisft("chat", "--checkpoint", path, "--max-new-tokens", 5,
                stdin="/help\nName a color.\n\nAnother one?\n/quit\n")
    assert r.returncode == 0, r.stderr
    style, conversation, at = get_style("alpaca"), [], 0
    for message in ("Name a color.", "Another one?"):  # /help never became a turn
        conversation.append({"role": "user", "content": message})
        reply = tokenizer.decode(generate(model, [tokenizer.encode(style.prompt(conversation))], 5)[0])
        at = r.stdout.index(reply, at) + len(reply)
        conversation.append({"role": "assistant", "content": reply.strip()})
    assert "/reset" in r.stdout.split(reply)[0]  # /help listed the commands before the first reply


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    r = minisft("eval", "--checkpoint", tmp_path / "nope.h5")
    assert r.returncode == 2 and "nope.h5: no such checkpoint file" in r.stderr and "Traceback" not in r.stderr
