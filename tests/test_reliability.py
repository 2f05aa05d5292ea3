"""Reliability, case by case: a run never lies, never loses work, and every bad input gets one clear line.

Each test runs the CLI in-process (minisft.cli.main) on a tiny random-init gpt2-tiny run over 40
records of the book's data (numpy backend, batch 2, a few steps) and checks the exit status, that
the message names the file, setting or record, and that nothing in the folder was lost or
half-written (a snapshot of every file's bytes before and after)."""
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from minisft.backends import resolve_dtype
from minisft.cli import main
from minisft.files import write_json
from minisft.rundir import LOCK, RunLock
from tests.conftest import ROOT
from tests.helpers import read_metrics


@pytest.fixture(scope="module")
def data(book_data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "forty.json"
    path.write_text(json.dumps(json.loads(book_data.read_text())[:40]))
    return path


def base(data, out, *more):
    return ["finetune", "--model", "gpt2-tiny", "--init", "random", "--data", str(data), "--batch-size", "2",
            "--eval-iter", "1", "--eval-freq", "1000", "--responses", "0", "--out", str(out), *map(str, more)]


def snapshot(folder) -> dict:
    """Every file under folder -> its sha256: any write, however small, shows."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def saved(data, tmp_path_factory) -> Path:
    """A finished 2-step run with a checkpoint at each step (read-only for the tests using it)."""
    out = tmp_path_factory.mktemp("saved") / "run"
    assert main(base(data, out, "--max-steps", 2, "--ckpt-every", 1, "--keep-last", 2)) == 0
    return out


def stepwise(out):
    return read_metrics(out, measured=False)


# ---- 1. --resume compares every result-changing setting ------------------------------------------------
@pytest.mark.parametrize("flag, value, said", [
    ("--lr", "1e-3", "--lr was 5e-05, now 0.001"),
    ("--weight-decay", "0.2", "--weight-decay was 0.1, now 0.2"),
    ("--schedule", "cosine", "--schedule was 'constant', now 'cosine'"),
    ("--seed", "7", "--seed was 123, now 7"),
    ("--mask-prompt", "input", "--mask-prompt was 'none', now 'input'"),
    ("--prompt-style", "chatml", "--prompt-style was 'alpaca', now 'chatml'"),
    ("--grad-accum", "2", "--grad-accum was 1, now 2"),
    ("--max-length", "128", "--max-length was 1024, now 128"),
    ("--dtype", "float64", f"--dtype was '{resolve_dtype('auto', 'numba')}', now 'float64'"),  # auto, as resolved
    ("--batch-size", "4", "--batch-size was 2, now 4"),
    ("--drop-long", None, "--drop-long was False, now True"),
])
def test_a_resume_with_a_changed_setting_is_refused_naming_it_and_writes_nothing(saved, data, flag, value, said,
                                                                                 capsys):
    before = snapshot(saved)
    code, _, err = run(base(data, saved, "--resume", flag, *([value] if value else [])), capsys)
    assert code == 2 and said in err and "step-000002.h5 was trained with other settings" in err
    assert snapshot(saved) == before  # settings.json above all


def test_a_resume_on_other_data_is_refused_and_settings_json_kept(saved, data, tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps(json.loads(data.read_text())[:30]))
    before = snapshot(saved)
    code, _, err = run(["finetune", "--resume", "--out", str(saved), "--data", str(other)], capsys)
    assert code == 2 and f"--data was {str(data)!r}, now {str(other)!r}" in err
    assert snapshot(saved) == before


def test_a_resume_names_every_changed_setting_at_once(saved, data, capsys):
    code, _, err = run(["finetune", "--resume", "--out", str(saved), "--lr", "1e-3", "--seed", "9"], capsys)
    assert code == 2 and "--lr was 5e-05, now 0.001; --seed was 123, now 9" in err


def test_a_resume_takes_the_saved_settings_and_records_an_explicit_amendment(saved, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(saved, out)
    code, printed, _ = run(["finetune", "--resume", "--out", str(out), "--max-steps", "3", "--eval-freq", "2"],
                           capsys)  # nothing else given: the saved run's data, model, batch size ...
    assert code == 0, printed
    assert "amending max_steps: 2 -> 3 from step 2 on" in printed and "amending eval_freq: 1000 -> 2" in printed
    recorded = json.loads((out / "settings.json").read_text())
    assert recorded["max_steps"] == 3 and recorded["batch_size"] == 2
    assert recorded["amendments"] == [{"step": 2, "setting": "eval_freq", "from": 1000, "to": 2},
                                      {"step": 2, "setting": "max_steps", "from": 2, "to": 3}]
    assert [r["step"] for r in stepwise(out) if r["kind"] == "step"] == [1, 2, 3]


# ---- 2. one run per folder -------------------------------------------------------------------------------
def test_a_second_run_into_a_held_folder_is_refused_naming_the_holder(saved, data, capsys):
    before = snapshot(saved)
    with RunLock(saved, log=lambda *_: None):  # this process holds it, as a running finetune would
        for extra in ([], ["--resume"]):
            code, _, err = run(base(data, saved, *extra), capsys)
            assert code == 2 and f"in use by pid {os.getpid()} on host {os.uname().nodename}" in err
    assert snapshot(saved) == before and not (saved / LOCK).exists()


def test_two_concurrent_runs_one_is_refused_and_the_folder_is_the_others(data, tmp_path, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "minisft", *base(data, out, "--max-steps", 3)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while first.poll() is None and not (out / LOCK).exists():
        time.sleep(0.005)
    code, _, err = run(base(data, out, "--max-steps", 5, "--lr", "1e-3"), capsys)
    assert first.wait() == 0, first.stderr.read()
    assert code == 2 and f"in use by pid {first.pid}" in err
    assert json.loads((out / "settings.json").read_text())["max_steps"] == 3  # the first run's, unmixed
    assert [r["step"] for r in stepwise(out) if r["kind"] == "step"] == [1, 2, 3]


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_message(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": "then"}))
    code, printed, _ = run(base(data, out, "--max-steps", 1), capsys)
    assert code == 0 and f"taking over the stale lock {out / LOCK} of pid {dead.pid}" in printed
    assert not (out / LOCK).exists()  # released at the end


def test_a_lock_from_another_host_is_refused_naming_it(saved, data, capsys):
    before = snapshot(saved)
    (saved / LOCK).write_text(json.dumps({"pid": 4242, "host": "elsewhere", "started": "then"}))
    try:
        code, _, err = run(base(data, saved, "--resume"), capsys)
    finally:
        (saved / LOCK).unlink()
    assert code == 2 and "pid 4242 on host elsewhere" in err and f"delete {saved / LOCK}" in err
    assert snapshot(saved) == before


# ---- 3. dead runs recover ------------------------------------------------------------------------------------
def test_a_run_that_died_before_its_first_checkpoint_starts_afresh_without_strays(data, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "settings.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"kind": "step", "step": 1}\n')
    (out / "checkpoints" / ".step-000002.h5.tmp-99999").write_bytes(b"\0" * 1000)  # a killed save
    (out / ".metrics.jsonl.abc123.tmp").write_text("x")                             # a killed atomic write
    code, printed, err = run(base(data, out, "--resume"), capsys)
    assert code == 2 and "has no checkpoint to resume from; run without --resume" in err
    code, printed, _ = run(base(data, out, "--max-steps", 2), capsys)
    assert code == 0 and "died before its first checkpoint; starting it afresh" in printed
    assert "removed 2 unfinished temp files" in printed
    assert not [p for p in out.rglob(".*") if p.is_file()]
    assert [r["step"] for r in stepwise(out) if r["kind"] == "step"] == [1, 2]


def test_resume_falls_back_past_a_damaged_newest_checkpoint_and_says_why(saved, data, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(saved, out)
    newest = out / "checkpoints" / "step-000002.h5"
    newest.write_bytes(newest.read_bytes()[:len(newest.read_bytes()) // 2])  # a cut-short copy
    code, printed, _ = run(["finetune", "--resume", "--out", str(out)], capsys)
    assert code == 0
    assert "skipping the damaged checkpoint step-000002.h5 (cannot be read" in printed
    assert f"resuming from {out / 'checkpoints' / 'step-000001.h5'} at step 1" in printed
    assert stepwise(out) == stepwise(saved)  # step 2 redone, bit for bit
    for name in ("step-000001.h5", "step-000002.h5"):
        with h5py.File(out / "checkpoints" / name) as a, h5py.File(saved / "checkpoints" / name) as b:
            for t in a["params"]:
                assert a["params"][t][()].tobytes() == b["params"][t][()].tobytes(), (name, t)


def test_a_finished_run_is_kept_unless_overwrite_is_asked_for(saved, data, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(saved, out)
    (out / "notes.txt").write_text("mine")
    (out / "adapter").mkdir()  # what an earlier LoRA run in this folder exported
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"an old adapter")
    before = snapshot(out)
    code, _, err = run(base(data, out, "--max-steps", 1), capsys)
    assert code == 2 and "already holds a run (newest checkpoint step-000002.h5)" in err and "--overwrite" in err
    assert snapshot(out) == before
    code, printed, _ = run(base(data, out, "--max-steps", 1, "--overwrite"), capsys)
    assert code == 0 and "--overwrite: removing the earlier run's files" in printed
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001.h5"]
    assert (out / "notes.txt").read_text() == "mine"  # not a run file: left alone
    assert not (out / "adapter").exists()  # the earlier run's export goes with its checkpoints


def test_overwrite_and_resume_together_are_refused(saved, data, capsys):
    before = snapshot(saved)
    code, _, err = run(base(data, saved, "--resume", "--overwrite"), capsys)
    assert code == 2 and "setting overwrite: --overwrite starts afresh, --resume continues" in err
    assert snapshot(saved) == before


# ---- 4. numbers are finite and in range --------------------------------------------------------------
@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--lr", "inf"), ("--weight-decay", "nan"),
                                         ("--grad-clip", "inf"), ("--drop-rate", "nan"), ("--min-lr", "-inf")])
def test_a_non_finite_setting_is_refused_before_anything_is_written(data, tmp_path, flag, value, capsys):
    code, _, err = run(base(data, tmp_path / "run", f"{flag}={value}"), capsys)
    assert code == 2 and f"setting {flag[2:]}: " in err and value.lstrip("-") in err
    assert not (tmp_path / "run").exists()


def test_a_non_finite_setting_in_toml_is_refused(data, tmp_path, capsys):
    (tmp_path / "c.toml").write_text("lr = nan\n")
    code, _, err = run(base(data, tmp_path / "run", "--config", tmp_path / "c.toml"), capsys)
    assert code == 2 and "setting lr: must be a finite number, got nan" in err


def nan_checkpoint(saved, tmp_path) -> Path:
    path = tmp_path / "nan.h5"
    shutil.copy(saved / "checkpoints" / "step-000002.h5", path)
    with h5py.File(path, "r+") as f:
        w = f["params/h.0.mlp.c_fc.weight"]
        a = w[()]
        a[3, 5] = np.nan
        w[...] = a
    return path


@pytest.mark.parametrize("argv", [
    ["eval", "--checkpoint", "{ckpt}", "--data", "{data}"],
    ["export", "{ckpt}", "{tmp}/hf"],
    ["generate", "--checkpoint", "{ckpt}", "--data", "{data}", "--out", "{tmp}/r.json", "--limit", "1"],
])
def test_a_checkpoint_holding_nan_is_refused_naming_the_tensor(saved, data, tmp_path, argv, capsys):
    ckpt = nan_checkpoint(saved, tmp_path)
    code, _, err = run([a.format(ckpt=ckpt, data=data, tmp=tmp_path) for a in argv], capsys)
    assert code == 2 and f"{ckpt}: dataset params/h.0.mlp.c_fc.weight holds 1 non-finite values" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.h5"]  # nothing exported, nothing written


@pytest.mark.parametrize("flag, value, said", [
    ("--temperature", "nan", "--temperature must be a finite number >= 0"),
    ("--temperature", "inf", "--temperature must be a finite number >= 0"),
    ("--top-p", "nan", "--top-p must be in (0, 1], got nan"),
    ("--top-k", "999999", "--top-k 999999 is more than the model's 50257 tokens"),
    ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
    ("--batch-size", "-1", "--batch-size must be at least 1, got -1"),
    ("--limit", "-1", "--limit must be at least 0, got -1"),
])
def test_generate_refuses_bad_numbers_before_generating(saved, data, tmp_path, flag, value, said, capsys):
    code, printed, err = run(["generate", "--checkpoint", str(saved / "checkpoints" / "step-000002.h5"), "--data",
                              str(data), "--out", str(tmp_path / "r.json"), flag, value], capsys)
    assert code == 2 and said in err and "wrote" not in printed and not (tmp_path / "r.json").exists()


# ---- 5. batches with nothing to train, records that are cut --------------------------------------------
@pytest.fixture(scope="module")
def long_data(data, tmp_path_factory) -> Path:
    """The forty records (at most 74 tokens each) with records 0 and 1 given an input of 200 words."""
    records = json.loads(data.read_text())
    for r in records[:2]:
        r["input"] = " ".join(["word"] * 200)
    path = tmp_path_factory.mktemp("long") / "long.json"
    path.write_text(json.dumps(records))
    return path


def test_a_batch_with_every_target_masked_is_skipped_and_counted(long_data, tmp_path, capsys):
    out = tmp_path / "run"
    code, printed, _ = run(base(long_data, out, "--max-steps", 3, "--max-length", 100, "--mask-prompt", "input",
                                "--no-shuffle"), capsys)
    assert code == 0
    assert "train: 2 of 34 records are longer than max-length 100 tokens and are cut; 2 of them lose their " \
           "whole response (train records 0, 1); --drop-long drops them" in printed
    assert "1 batches had no trained target" in printed
    # batch 0 is records 0 and 1: its step makes no update (and so no evaluation)
    assert [r["kind"] for r in stepwise(out)] == ["skip", "step", "step", "eval"]  # the end evaluates the last weights
    assert json.loads((out / "summary.json").read_text())["empty_batches"] == 1


def test_drop_long_drops_the_cut_records(long_data, tmp_path, capsys):
    out = tmp_path / "run"
    code, printed, _ = run(base(long_data, out, "--max-steps", 2, "--max-length", 100, "--mask-prompt", "input",
                                "--no-shuffle", "--drop-long"), capsys)
    assert code == 0 and "are dropped; 2 of them lose" in printed
    assert [r["kind"] for r in stepwise(out)] == ["step", "eval", "step", "eval"]  # no batch left without a target


def test_a_max_length_that_leaves_no_target_anywhere_is_refused(data, tmp_path, capsys):
    code, _, err = run(base(data, tmp_path / "run", "--max-length", 24, "--mask-prompt", "input"), capsys)
    assert code == 2 and "setting max_length: at 24 tokens no training record keeps a trained target" in err
    assert not [p for p in (tmp_path / "run").rglob("*") if p.is_file()]


# ---- 7. outputs are checked before the work ---------------------------------------------------------------
@pytest.mark.parametrize("where, said", [("missing/r.json", "the folder {tmp}/missing does not exist"),
                                         ("adir", "{tmp}/adir: is a folder")])
def test_generate_checks_its_output_before_generating(saved, data, tmp_path, where, said, capsys, monkeypatch):
    (tmp_path / "adir").mkdir()
    monkeypatch.setattr("minisft.cli.generate.load_model", lambda args: pytest.fail("the model was loaded"))
    code, _, err = run(["generate", "--checkpoint", str(saved / "checkpoints" / "step-000002.h5"), "--data",
                        str(data), "--out", str(tmp_path / where)], capsys)
    assert code == 2 and said.format(tmp=tmp_path) in err


def test_export_into_an_existing_file_is_refused_and_the_file_kept(saved, tmp_path, capsys):
    (tmp_path / "f").write_text("keep")
    code, _, err = run(["export", str(saved / "checkpoints" / "step-000002.h5"), str(tmp_path / "f")], capsys)
    assert code == 2 and f"DIR {tmp_path / 'f'}: is a file, not a folder" in err
    assert (tmp_path / "f").read_text() == "keep"


# ---- 8. a crafted checkpoint cannot make us allocate --------------------------------------------------------
@pytest.mark.parametrize("change, said", [
    ({"n_layers": 10 ** 9}, "the config says 1000000000 layers, params/ holds tensors of 2"),
    ({"vocab_size": 10 ** 9}, "params/wte.weight is (50257, 64), the config needs (1000000000, 64)"),
])
def test_a_crafted_config_is_checked_against_the_stored_tensors_first(saved, tmp_path, change, said, capsys):
    path = tmp_path / "crafted.h5"
    shutil.copy(saved / "checkpoints" / "step-000002.h5", path)
    with h5py.File(path, "r+") as f:
        cfg = {**json.loads(f["config"].asstr()[()]), **change}
        del f["config"]
        f["config"] = json.dumps(cfg)
    code, _, err = run(["export", str(path), str(tmp_path / "hf")], capsys)
    assert code == 2 and said in err and not (tmp_path / "hf").exists()


# ---- 9. tracebacks become one line ----------------------------------------------------------------------------
@pytest.mark.parametrize("error, said", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device; the disk is full"),
    (PermissionError(errno.EACCES, "Permission denied"), "Permission denied; no permission"),
    (OSError(errno.EROFS, "Read-only file system"), "Read-only file system; the file system is read-only"),
])
def test_a_full_or_unwritable_disk_is_one_line_naming_the_path(saved, data, tmp_path, error, said, capsys,
                                                               monkeypatch):
    """The checkpoint write fails as the disk would make it fail (this runs as root, for whom no
    permission is denied, so the error is injected where it would surface)."""
    out = tmp_path / "run"
    shutil.copytree(saved, out)
    target = out / "checkpoints" / "step-000003.h5"

    def fail(path, *a, **k):
        raise type(error)(error.errno, error.strerror, str(target))
    monkeypatch.setattr("minisft.train.save_checkpoint", fail)
    before = {k: v for k, v in snapshot(out).items() if k.startswith("checkpoints/")}
    code, _, err = run(["finetune", "--resume", "--out", str(out), "--max-steps", "3"], capsys)
    assert code == 1 and err.startswith(f"minisft: error: {target}: {said}")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert {k: v for k, v in snapshot(out).items() if k.startswith("checkpoints/")} == before
    assert not (out / LOCK).exists()


def test_an_out_below_a_file_is_one_line_naming_the_path(data, tmp_path, capsys):
    (tmp_path / "f").write_text("keep")
    code, _, err = run(base(data, tmp_path / "f" / "run"), capsys)
    assert code == 1 and err.startswith(f"minisft: error: {tmp_path / 'f' / 'run'}: Not a directory; a part of")
    assert (tmp_path / "f").read_text() == "keep"


def test_out_of_memory_is_one_line(data, tmp_path, capsys, monkeypatch):
    def oom(*a, **k):
        raise MemoryError
    monkeypatch.setattr("minisft.train.model_source", oom)
    code, _, err = run(base(data, tmp_path / "run", "--max-steps", 1), capsys)
    assert code == 1 and err.startswith("minisft: error: out of memory; use a smaller model, --batch-size")
    assert not (tmp_path / "run" / LOCK).exists()


def test_a_folder_as_config_or_data_is_named(saved, data, tmp_path, capsys):
    code, _, err = run(base(data, tmp_path / "run", "--config", tmp_path), capsys)
    assert code == 2 and f"config file {tmp_path} is a folder" in err
    code, _, err = run(base(tmp_path, tmp_path / "run"), capsys)
    assert code == 2 and f"setting data: {tmp_path} is a folder" in err
    code, _, err = run(["eval", "--checkpoint", str(saved / "checkpoints" / "step-000002.h5"), "--data",
                        str(tmp_path)], capsys)
    assert code == 2 and f"{tmp_path}: is a folder, not a file" in err


def test_finetune_on_torch_without_torch_says_so(data, tmp_path):
    code = (f"import sys; sys.modules['torch'] = None; from minisft.cli import main; "
            f"sys.exit(main({base(data, tmp_path / 'run', '--backend', 'torch', '--max-steps', 1)!r}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "setting backend: torch cannot run here" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run" / LOCK).exists()


def test_a_deeply_nested_safetensors_header_is_refused(tmp_path, capsys):
    raw = b"[" * 100_000 + b"]" * 100_000
    (tmp_path / "deep.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
    code, _, err = run(["chat", "--weights", str(tmp_path / "deep.safetensors"), "--model", "gpt2-tiny"], capsys)
    assert code == 2 and f"{tmp_path / 'deep.safetensors'}: not a valid safetensors file: header nests" in err


def test_eval_max_length_zero_is_refused(saved, data, capsys):
    code, _, err = run(["eval", "--checkpoint", str(saved / "checkpoints" / "step-000002.h5"), "--data", str(data),
                        "--max-length", "0"], capsys)
    assert code == 2 and "--max-length must be at least 1, got 0" in err


def test_a_url_that_served_junk_is_fetched_again_next_time(data, tmp_path, capsys, monkeypatch):
    from tests.file_server import FileServer

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "d.json").write_text("<html>rate limited</html>")
    server = FileServer(tmp_path / "srv")
    try:
        url = f"{server.url}/d.json"
        argv = base(url, tmp_path / "run", "--max-steps", 1, "--cache-dir", tmp_path / "cache")
        code, _, err = run(argv, capsys)
        assert code == 2 and f"{url}: the download is not a data file, so it was removed from the cache" in err
        shutil.copy(data, tmp_path / "srv" / "d.json")  # the server serves the real file now
        code, _, _ = run(argv, capsys)
        assert code == 0 and len(server.requests) == 2
    finally:
        server.close()


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_written_files_honour_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        write_json(tmp_path / "x.json", [1])
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~mask
