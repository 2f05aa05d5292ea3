"""SIGKILL at points of a tiny run (in its first checkpoint write, between steps, during the export, at a
random moment): the folder always recovers. With a checkpoint on disk `--resume` continues it, without
one the plain command starts it afresh (the dead run's lock is stale, its temp files strays); either
way the run completes to the uninterrupted result, bit for bit, and leaves no stray file. Every run is a
fresh `python -m minisft`, as a user's is, so nothing the test process holds (torch imported, the OpenMP
settings other tests left) can tell the runs apart."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minisft.rundir import LOCK, checkpoints
from tests.conftest import ROOT
from tests.helpers import read_metrics


@pytest.fixture(scope="module")
def data(book_data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "forty.json"
    path.write_text(json.dumps(json.loads(book_data.read_text())[:40]))
    return path


def argv(data, out):
    return ["finetune", "--model", "gpt2-tiny", "--init", "random", "--data", str(data), "--batch-size", "2",
            "--eval-iter", "1", "--eval-freq", "2", "--responses", "0", "--max-steps", "6", "--ckpt-every", "2",
            "--drop-rate", "0.1", "--out", str(out)]


def command(data, out):
    return [sys.executable, "-m", "minisft", *argv(data, out)]


def run(args):
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def whole(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    run(command(data, out))
    return out


def first_checkpoint_write(out):
    return any((out / "checkpoints").glob(".step-000002.h5.tmp-*"))


def between_steps(out):
    metrics = out / "metrics.jsonl"
    return metrics.exists() and metrics.read_text().count('"kind": "step"') >= 3


def during_export(out):
    return (out / "hf").exists()


def at_random(seed):
    moment = time.monotonic() + np.random.default_rng(seed).uniform(1.0, 4.0)  # seconds after the start
    return lambda out: time.monotonic() >= moment


@pytest.mark.parametrize("when", [first_checkpoint_write, between_steps, during_export, at_random(17)],
                         ids=["first-checkpoint-write", "between-steps", "during-export", "random"])
def test_a_killed_run_recovers_to_the_uninterrupted_result(data, whole, tmp_path, when):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(data, out), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not when(out):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    if proc.wait() != -signal.SIGKILL and when.__name__ != "<lambda>":
        pytest.fail(f"the run ended ({proc.returncode}) before it could be killed {when.__name__.replace('_', ' ')}")
    if proc.returncode == -signal.SIGKILL and (out / "settings.json").exists():
        assert (out / LOCK).exists()  # left behind: the dead run never released it

    resume = ["--resume"] if checkpoints(out) else []
    run(command(data, out) + resume)

    assert read_metrics(out, False) == read_metrics(whole, False)
    assert (out / "hf" / "model.safetensors").read_bytes() == (whole / "hf" / "model.safetensors").read_bytes()
    assert [p.name for p in checkpoints(out)] == [p.name for p in checkpoints(whole)]
    stray = [p.relative_to(out) for p in out.rglob("*") if p.name.startswith(".") or p.name == LOCK]
    assert not stray
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in whole.iterdir())
