"""`minisft data clean` and `minisft data convert`: each rule drops exactly the records it should,
the report names every one, the output holds exactly the rest, and conversion loses nothing."""
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minisft import curate
from minisft.cli import main
from minisft.data import convert_file, convert_record, read_records
from minisft.errors import MinisftError

ROOT = Path(__file__).resolve().parents[1]


def minisft(*args):
    return subprocess.run([sys.executable, "-m", "minisft", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def run_in_process(capsys, *args):
    """(exit status, stderr) of the CLI called in this process (a subprocess costs a second)."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def sentence(rng, n):
    """n random lowercase words (3-8 letters): two sentences share no long run by chance."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return " ".join("".join(rng.choice(letters, rng.integers(3, 9))) for _ in range(n))


def record(rng, with_input):
    return {"instruction": sentence(rng, 12).capitalize() + ".",
            "input": sentence(rng, 8) if with_input else "",
            "output": sentence(rng, 16).capitalize() + "."}


def crafted(rng):
    """100 records (minisft's split: train 0-84, test 85-94, val 95-99) with planted problems in
    train; returns the records and {index: (reason, index it duplicates or None)}."""
    recs = [record(rng, i % 3 == 0) for i in range(100)]
    planted = {}

    def plant(i, rec, reason, of=None):
        recs[i] = rec
        planted[i] = (reason, of)

    # exact duplicates: case, whitespace and punctuation changed
    plant(20, {**recs[3], "instruction": "  " + recs[3]["instruction"].upper().replace(".", "!") + "  "},
          "exact-duplicate", 3)
    plant(41, {**recs[7], "output": recs[7]["output"].replace(" ", "\n  ", 2) + "!!"}, "exact-duplicate", 7)
    # near duplicates: one word of the output changed
    # (77 changes another word of 11: it is nearer to 11 than to 30, and 30 is not kept anyway)
    for i, of, word in [(30, 11, 5), (52, 12, 5), (77, 11, 9)]:
        ws = recs[of]["output"].split()
        ws[word] = "replacement"
        plant(i, {**recs[of], "output": " ".join(ws)}, "near-duplicate", of)
    # contaminated: copied from the test and val parts with different casing
    plant(25, {k: v.upper() for k, v in recs[88].items()}, "contaminated")
    plant(60, {**{k: v.title() for k, v in recs[96].items()}, "output": "Something else entirely here."},
          "contaminated")
    # over-long (more than --max-length 200 tokens) and empty
    plant(33, {**recs[33], "output": sentence(rng, 150)}, "too-long")
    plant(48, {**recs[48], "output": "  \n\t "}, "empty")
    plant(66, {**recs[66], "instruction": " "}, "empty")
    return recs, planted


def test_clean_drops_exactly_the_planted_records_and_keeps_the_rest(tmp_path):
    recs, planted = crafted(np.random.default_rng(0))
    src, out, rep = tmp_path / "d.json", tmp_path / "clean.json", tmp_path / "report.json"
    src.write_text(json.dumps(recs, indent=4))
    r = minisft("data", "clean", src, "--out", out, "--report", rep, "--against-own-split", "--max-length", 200)
    assert r.returncode == 0, r.stderr
    report = json.loads(rep.read_text())
    got = {d["index"]: (d["reason"], d.get("duplicate_of")) for d in report["dropped"]}
    assert got == planted
    assert json.loads(out.read_text()) == [rec for i, rec in enumerate(recs) if i not in planted]
    assert report["kept"] == 100 - len(planted) and report["checked"] == 85 and report["evaluation_records"] == 15
    assert report["dropped_by_step"] == {step: sum(v[0] == step for v in planted.values()) for step in curate.STEPS}
    contaminated = {d["index"]: d for d in report["dropped"] if d["reason"] == "contaminated"}
    assert contaminated[25]["matches"].endswith("record 88 (test part)")
    assert contaminated[60]["matches"].endswith("record 96 (val part)")
    assert len(contaminated[25]["ngram"].split()) == 13
    near = [d for d in report["dropped"] if d["reason"] == "near-duplicate"]
    assert all(0.8 <= d["similarity"] < 1 for d in near)
    h = report["token_lengths"]
    assert sum(h["before"]) == 100 and sum(h["after"]) == report["kept"]
    assert f"kept {report['kept']} of 100 records" in r.stdout and "near-duplicate   dropped 3" in r.stdout


def test_the_steps_run_in_the_documented_order_and_fill_the_fields_they_declare(tmp_path):
    documented = re.findall(r"^    ([a-z-]+)  ", curate.__doc__, re.M)  # the docstring's table of steps
    assert documented == list(curate.STEPS) == [step.name for step in curate.PIPELINE]
    recs, _ = crafted(np.random.default_rng(0))
    src = tmp_path / "d.json"
    src.write_text(json.dumps(recs))
    report = curate.clean(src, tmp_path / "o.json", curate.CleanSettings(max_length=200, against_own_split=True))
    details = {step.name: step.details for step in curate.PIPELINE}
    assert len({d["reason"] for d in report["dropped"]}) == 5
    for d in report["dropped"]:
        assert list(d) == ["index", "reason", *details[d["reason"]]]


def test_clean_is_reproducible_and_skipped_steps_drop_nothing(tmp_path):
    recs, planted = crafted(np.random.default_rng(1))
    src = tmp_path / "d.json"
    src.write_text(json.dumps(recs))
    s = curate.CleanSettings(max_length=200, against_own_split=True)
    a = curate.clean(src, tmp_path / "a.json", s)
    b = curate.clean(src, tmp_path / "b.json", s)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert a["dropped"] == b["dropped"]
    skip = curate.CleanSettings(max_length=200, against_own_split=True, skip=frozenset({"near-duplicate", "empty"}))
    c = curate.clean(src, tmp_path / "c.json", skip)
    assert {d["index"] for d in c["dropped"]} == {i for i, (why, _) in planted.items()
                                                 if why not in ("near-duplicate", "empty")}


def test_each_filter_drops_its_record_with_the_reason(tmp_path):
    rng = np.random.default_rng(2)
    recs = [record(rng, False) for _ in range(9)]
    recs[1]["output"] = "Fine.\x07 " + recs[1]["output"]                      # a BEL control character
    recs[2]["output"] = "As an AI  language model, I " + recs[2]["output"]    # boilerplate, spaced oddly
    recs[3] = {"instruction": "12345 67890 == 4242 ++ 9.9", "input": "", "output": "0x1f 0x2e 7.7.7 ###"}
    recs[4]["output"] = "Yes"                                                   # 1 token: under 2
    recs[5]["input"] = "caf\ufffd"                                              # a decoding error's mark
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "o.jsonl"
    rep = curate.clean(src, out, curate.CleanSettings(min_response_tokens=2))
    got = {d["index"]: d["reason"] for d in rep["dropped"]}
    assert got == {1: "control-chars", 2: "boilerplate", 3: "non-text", 4: "response-length", 5: "control-chars"}
    assert rep["dropped"][0]["char"] == "U+0007" and rep["dropped"][1]["phrase"] == "as an ai language model"
    assert out.read_text() == "".join(json.dumps(r) + "\n" for i, r in enumerate(recs) if i not in got)


def test_truncate_cuts_the_last_response_to_the_context_length(tmp_path):
    rng = np.random.default_rng(3)
    recs = [record(rng, False) for _ in range(3)]
    recs[1]["output"] = sentence(rng, 200)
    recs[2] = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentence(rng, 5)},
                            {"role": "user", "content": "more"}, {"role": "assistant", "content": sentence(rng, 200)}],
               "id": "x"}
    src, out = tmp_path / "d.json", tmp_path / "o.json"
    src.write_text(json.dumps(recs))
    rep = curate.clean(src, out, curate.CleanSettings(max_length=150, too_long="truncate"))
    assert rep["dropped"] == [] and [t["index"] for t in rep["truncated"]] == [1, 2]
    assert all(t["tokens_before"] > 150 >= t["tokens_after"] > 140 for t in rep["truncated"])
    kept = json.loads(out.read_text())
    assert kept[0] == recs[0] and recs[1]["output"].startswith(kept[1]["output"])
    assert kept[2]["id"] == "x" and kept[2]["messages"][:3] == recs[2]["messages"][:3]
    assert recs[2]["messages"][3]["content"].startswith(kept[2]["messages"][3]["content"])
    h = rep["token_lengths"]  # the last bin holds what is longer than the context, before truncation only
    assert h["bin_edges"][-2] == 151 and h["before"][-1] == 2 and h["after"][-1] == 0 and sum(h["after"]) == 3


def brute_force_near_duplicates(sets, threshold):
    dups, kept = {}, []
    for i, s in enumerate(sets):
        sims = [(curate.jaccard(s, sets[j]), -j) for j in kept]
        best = max(sims, default=None)
        if best and best[0] >= threshold:
            dups[i] = (-best[1], best[0])
        else:
            kept.append(i)
    return dups


def test_near_duplicates_equal_the_brute_force_search():
    rng = np.random.default_rng(4)
    base = [np.unique(rng.integers(0, 2 ** 63, 40, dtype=np.int64).astype(np.uint64)) for _ in range(150)]
    sets = list(base)
    for _ in range(150):  # variants of random sets with similarity spread around the threshold
        src = base[rng.integers(len(base))]
        k = rng.integers(0, 12)
        new = rng.integers(0, 2 ** 63, k, dtype=np.int64).astype(np.uint64)
        sets.append(np.unique(np.concatenate([rng.permutation(src)[k:], new])))
    order = rng.permutation(len(sets))
    sets = [sets[i] for i in order]
    found = curate.near_duplicates(sets, 0.8, 128, seed=0, progress=False)
    expected = brute_force_near_duplicates(sets, 0.8)
    assert 20 < len(expected) < 150  # the threshold cuts through the planted variants
    assert found == expected


def test_lsh_banding_meets_its_recall_at_the_threshold():
    for perms, t in itertools.product((64, 128, 256), (0.5, 0.7, 0.8, 0.9)):
        bands, rows = curate.lsh_bands(perms, t)
        assert bands * rows <= perms
        assert 1 - (1 - t ** rows) ** bands >= curate.LSH_RECALL
        assert 1 - (1 - t ** (rows + 1)) ** (perms // (rows + 1)) < curate.LSH_RECALL  # the most rows that do


def test_convert_alpaca_to_openai_and_back_is_byte_exact(tmp_path, book_data):
    book = book_data
    openai, back = tmp_path / "openai.json", tmp_path / "back.json"
    convert_file(book, "openai", openai)
    first = json.loads(openai.read_text())[0]
    assert set(first) == {"messages"} and first["messages"][0]["role"] == "user"
    convert_file(openai, "alpaca", back)
    assert back.read_bytes() == book.read_bytes()
    # JSON Lines, an absent input, extra keys (record and turn), a non-ASCII character
    lines = [{"instruction": "Say hi", "output": "Hi — there", "id": 7},
             {"instruction": "Add", "input": "2 3", "output": "5", "source": {"a": [1]}}]
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in lines))
    for fmt in ("openai", "sharegpt"):
        mid, back = tmp_path / f"{fmt}.jsonl", tmp_path / f"back-{fmt}.jsonl"
        assert main(["data", "convert", str(src), "--to", fmt, "--out", str(mid)]) == 0
        assert main(["data", "convert", str(mid), "--to", "alpaca", "--out", str(back)]) == 0
        assert back.read_bytes() == src.read_bytes()


def test_convert_between_turn_formats_keeps_every_key():
    rec = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hello", "weight": 0}, {"from": "human", "value": "Bye"},
                             {"from": "gpt", "value": "Bye!"}], "id": "c1"}
    openai = convert_record(rec, "openai")
    assert openai == {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                   {"role": "assistant", "content": "Hello", "weight": 0},
                                   {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}],
                      "id": "c1"}
    assert convert_record(openai, "sharegpt") == rec


def test_convert_refuses_a_record_alpaca_cannot_hold(tmp_path):
    recs = [{"instruction": "a", "input": "", "output": "b"},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                          {"role": "assistant", "content": "a"}]}]
    src, out = tmp_path / "m.json", tmp_path / "o.json"
    src.write_text(json.dumps(recs))
    r = minisft("data", "convert", src, "--to", "alpaca", "--out", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{src}: record 1: cannot be written as Alpaca" in r.stderr and "a system message" in r.stderr
    assert not out.exists()
    with pytest.raises(MinisftError, match="record 0: cannot be written as Alpaca .* 2 assistant turns"):
        convert_record({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
                                     {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
                       "alpaca", "record 0")


@pytest.mark.parametrize("bad, message", [
    ({"instruction": "a", "input": "", "output": 3}, "record 2: field 'output': expected a string, got a number"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "record 2: field 'messages[0].role': unknown role 'robot'"),
    ({"conversations": [{"from": "human"}]}, "record 2: field 'conversations[0].value': missing"),
])
def test_clean_refuses_malformed_input_naming_file_record_field(tmp_path, capsys, bad, message):
    recs = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": "", "output": "d"}, bad]
    src, out, rep = tmp_path / "bad.json", tmp_path / "o.json", tmp_path / "r.json"
    src.write_text(json.dumps(recs))
    code, err = run_in_process(capsys, "data", "clean", src, "--out", out, "--report", rep)
    assert code == 2 and err.startswith(f"minisft: error: {src}: {message}")
    assert not out.exists() and not rep.exists()


def test_clean_refuses_bad_settings_and_evaluation_files_before_work(tmp_path, capsys):
    src, out = tmp_path / "d.json", tmp_path / "o.json"
    src.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}]))
    evalf = tmp_path / "eval.jsonl"
    evalf.write_text('{"instruction": "x", "output": "y"}\n{"instruction": 5}\n')
    for args, message in [(("--threshold", "1.5"), "--threshold must be in (0, 1], got 1.5"),
                          (("--against", evalf), f"{evalf}: line 2 (record 1): field 'instruction': expected a string"),
                          (("--max-response-tokens", "0"), "--max-response-tokens 0 is below --min-response-tokens 1"),
                          (("--report", tmp_path / "no" / "r.json"),
                           "--report " + str(tmp_path / "no" / "r.json") + ": the folder"),
                          (("--skip", "empty", "--against", tmp_path / "none.json"), "none.json: no such file")]:
        code, err = run_in_process(capsys, "data", "clean", src, "--out", out, *args)
        assert code == 2 and message in err, err
        assert not out.exists()


def test_clean_keeps_the_file_layout_and_each_record_format(tmp_path):
    recs = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"conversations": [{"from": "human", "value": "Name a colour!"}, {"from": "gpt", "value": "blue"}]},
            {"messages": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Pear."}]}]
    src, out = tmp_path / "d.jsonl", tmp_path / "o.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    rep = curate.clean(src, out, curate.CleanSettings())
    assert [d["index"] for d in rep["dropped"]] == [1] and rep["dropped"][0]["duplicate_of"] == 0
    assert [rec for _, rec in read_records(out)] == [recs[0], recs[2]]
    assert rep["formats"] == {"alpaca": 1, "sharegpt": 1, "openai": 1} and rep["layout"] == "jsonl"


def test_contamination_check_of_a_block_equals_the_check_of_each_text():
    rng = np.random.default_rng(5)
    vocab = np.arange(1, 300, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # word hashes
    dc = curate.Contamination(13, curate.WordHasher())
    evals = [rng.choice(vocab, rng.integers(5, 40)) for _ in range(30)]  # some shorter than 13 words
    for k, e in enumerate(evals):
        dc.add(e, f"eval {k}")
    texts = []
    for _ in range(400):
        t = rng.choice(vocab, rng.integers(1, 60))
        if rng.random() < 0.3:  # plant a piece of an evaluation text, sometimes only 12 of 13 words
            e = evals[rng.integers(len(evals))]
            n = min(len(e), 13) - (rng.random() < 0.3)
            at = rng.integers(0, len(e) - n + 1)
            t = np.concatenate([t[:len(t) // 2], e[at:at + n], t[len(t) // 2:]])
        texts.append(t)
    expected = np.array([dc.find(t) is not None for t in texts])
    assert 50 < expected.sum() < 350
    assert np.array_equal(dc.hits(texts), expected)
