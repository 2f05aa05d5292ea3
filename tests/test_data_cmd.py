"""`minisft data stats` and `minisft data inspect`, run as real processes (data stats' numbers also
in-process, from the library)."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from minisft import tokenizer
from minisft.data import DEFAULT_DATA_URL, load_records
from minisft.datastats import data_stats
from minisft.prompts import get_style
from tests.file_server import FileServer
from tests.helpers import book_training_text

ROOT = Path(__file__).resolve().parents[1]


def minisft(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, "-m", "minisft", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env=env, check=False)


@pytest.fixture
def served(tmp_path, book_data):
    """The URL of a small data file on a loopback HTTP server."""
    root = tmp_path / "srv"
    root.mkdir()
    recs = json.loads(book_data.read_text(encoding="utf-8"))[:20]
    (root / "small.json").write_text(json.dumps(recs, indent=4))
    server = FileServer(root)
    yield f"{server.url}/small.json"
    server.close()


def offline_env(tmp_path):
    """No proxy for loopback, and a download cache of the test's own."""
    return {**os.environ, "NO_PROXY": "127.0.0.1", "MINISFT_CACHE_DIR": str(tmp_path / "cache")}


def test_every_data_command_reads_a_url_as_finetune_does(tmp_path, served):
    env = offline_env(tmp_path)
    for args in (("stats", served), ("inspect", served, "--index", 3),
                 ("clean", served, "--out", tmp_path / "clean.json"),
                 ("convert", served, "--to", "openai", "--out", tmp_path / "small.jsonl")):
        r = minisft("data", *args, env=env)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.stderr)
    assert len(json.loads((tmp_path / "clean.json").read_text())) == 20
    assert len((tmp_path / "small.jsonl").read_text().splitlines()) == 20


def test_every_data_command_reads_the_books_url_from_the_bundled_copy(tmp_path, book_data):
    env = {**offline_env(tmp_path), "HTTPS_PROXY": "http://127.0.0.1:9"}  # a download would fail
    for args in (("stats",), ("inspect", "--index", 0), ("clean", "--out", tmp_path / "clean.json"),
                 ("convert", DEFAULT_DATA_URL, "--to", "alpaca", "--out", tmp_path / "same.json")):
        r = minisft("data", *args, env=env)
        assert r.returncode == 0, (args, r.stderr)
    assert (tmp_path / "same.json").read_bytes() == book_data.read_bytes()


def test_convert_writes_the_layout_the_out_extension_names_or_the_flag_says(tmp_path, book_data):
    lines, listed, flagged = tmp_path / "a.jsonl", tmp_path / "a.json", tmp_path / "a.data"
    for args in ((lines,), (listed,), (flagged, "--layout", "jsonl")):
        r = minisft("data", "convert", book_data, "--to", "openai", "--out", *args)
        assert r.returncode == 0, r.stderr
    assert [json.loads(line) for line in lines.read_text().splitlines()] == json.loads(listed.read_text())
    assert flagged.read_bytes() == lines.read_bytes()
    r = minisft("data", "convert", book_data, "--to", "openai", "--out", tmp_path / "a.txt")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "a.txt" in r.stderr and "--layout" in r.stderr
    assert not (tmp_path / "a.txt").exists()


def readme_data_examples():
    """The `minisft data` commands of README.md, in order, each with the output block shown under
    it when it is one ("$ minisft data ..." then the lines it prints, up to the block's end)."""
    examples, lines = [], (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        command = line.removeprefix("$ ")
        if command.startswith("minisft data "):
            shown = None
            if line.startswith("$ "):
                end = lines.index("```", i)
                shown = lines[i + 1:end]
            examples.append((shlex.split(command, comments=True), shown))
    return examples


def test_the_readmes_data_examples_run_as_written(tmp_path):
    examples = readme_data_examples()
    for argv, shown in examples:
        r = minisft(*argv[1:], cwd=tmp_path, env=offline_env(tmp_path))
        assert r.returncode == 0, (argv, r.stderr)
        if shown is not None:  # the same lines, but for the seconds it took
            def untimed(text):
                return [re.sub(r"\(\d+\.\d s\)$", "(_ s)", line) for line in text]
            assert untimed(r.stdout.splitlines()[:len(shown)]) == untimed(shown), argv
    assert any(shown for _, shown in examples) and {argv[2] for argv, _ in examples} >= {"stats", "clean", "convert"}


def test_stats_on_the_book_data(book_data, tiktoken_gpt2):
    r = minisft("data", "stats", book_data, "--max-length", "80")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "1100 records (1100 single-turn, 0 multi-turn; 0 with a system message; 325 Alpaca inputs)" in out
    assert "split (file order): train 935, val 55, test 110" in out
    assert "min 40, median 55, mean 56.4, max 91" in out
    entries = json.loads(book_data.read_text(encoding="utf-8"))
    over_80 = sum(len(tiktoken_gpt2.encode(book_training_text(e))) > 80 for e in entries)
    assert 0 < over_80 < 1100
    assert f"longer than 80 tokens (gpt2-medium's context 1024, --max-length 80; truncated in training): {over_80}" \
        in out

    assert "exact duplicates (same rendered text as an earlier record): 0" in out
    histogram = [line.split() for line in out.splitlines() if re.match(r"\s+\d+ - +\d+ \|", line)]
    assert [(int(h[0]), int(h[2])) for h in histogram] == [(40 + 6 * i, 45 + 6 * i) for i in range(9)]
    assert sum(int(h[-1]) for h in histogram) == 1100


def test_stats_counts_overlong_records_against_the_chosen_models_context(book_data, tiktoken_gpt2):
    r = minisft("data", "stats", book_data, "--model", "gpt2-tiny", "--max-length", "4096")
    assert r.returncode == 0, r.stderr
    entries = json.loads(book_data.read_text(encoding="utf-8"))
    over = sum(len(tiktoken_gpt2.encode(book_training_text(e))) > 256 for e in entries)
    assert (f"longer than 256 tokens (gpt2-tiny's context 256, --max-length 4096; truncated in training): {over}"
            in r.stdout)

def test_stats_counts_duplicates_and_overlap(tmp_path):
    recs = [{"instruction": f"Task {i}", "input": "", "output": f"Answer {i}"} for i in range(20)]
    recs[19] = {"instruction": "  TASK 0 ", "input": "", "output": "another answer"}  # test item, same prompt
    recs[5] = dict(recs[4])  # an exact duplicate inside train
    path = tmp_path / "d.json"
    path.write_text(json.dumps(recs))
    r = minisft("data", "stats", path)
    assert r.returncode == 0, r.stderr
    assert "split (file order): train 17, val 1, test 2" in r.stdout
    assert "exact duplicates (same rendered text as an earlier record): 1" in r.stdout
    assert "val records whose prompt (case and whitespace normalised) is also in train: 1" in r.stdout
    assert "test records whose prompt (case and whitespace normalised) is also in train: 0" in r.stdout


def test_data_stats_is_library_code_the_command_only_prints(tmp_path):
    recs = [{"instruction": f"Task {i}", "input": "", "output": f"Answer {i}"} for i in range(20)]
    recs[19] = {"instruction": "  TASK 0 ", "input": "", "output": "another answer"}
    recs[5] = dict(recs[4])
    recs[7] = {"instruction": "Say <|endoftext|>", "input": "x", "output": "y"}
    path = tmp_path / "d.json"
    path.write_text(json.dumps(recs))
    style = get_style("alpaca")
    lengths = [len(tokenizer.encode(style.training_text(r["messages"]))) for r in load_records(path)]
    s = data_stats(load_records(path), style, limit=sorted(lengths)[-3])
    assert (s.records, s.single_turn, s.multi_turn, s.with_system, s.alpaca_inputs) == (20, 20, 0, 0, 1)
    assert s.split == {"train": 17, "val": 1, "test": 2} and s.in_train == {"val": 1, "test": 0}
    assert s.lengths.tolist() == lengths and s.tokens["max"] == max(lengths) and s.longer == 2
    assert (s.duplicates, s.literal_eot) == (1, 1)


def test_inspect_shows_each_token_and_its_mask(book_data):
    r = minisft("data", "inspect", book_data, "--index", 50, "--mask-prompt", "header")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "== record 50 of 1100: alpaca style, mask=header ==" in lines
    assert "### Input:" in lines and "Ocassion" in lines
    tokens = [line.split() for line in lines if line[:6].strip().isdigit()]
    assert len(tokens) == 58  # 57 tokens + the appended end-of-text
    assert tokens[0][:3] == ["0", "21106", "-"]
    assert [t[2] for t in tokens[1:]] == ["mask"] * 48 + ["train"] * 9
    assert tokens[49][1] == "464" and tokens[-1][1:3] == ["50256", "train"]
    assert lines[-1] == "9 of 57 targets trained"


def test_errors_exit_2_without_traceback(tmp_path, book_data):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a", "input": "", "output": ""}]))
    for args, message in [
        (("data", "stats", bad), f"minisft: error: {bad}: record 0: field 'output': empty output"),
        (("data", "inspect", book_data, "--index", 1100),
         "--index 1100 is out of range: the file has 1100 records (0 to 1099)"),
        (("data", "stats", tmp_path / "nope.json"), "no such file"),
    ]:
        r = minisft(*args)
        assert r.returncode == 2
        assert message in r.stderr and "Traceback" not in r.stderr
