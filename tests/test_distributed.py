"""Data-parallel `minisft finetune` on torch.distributed: two gloo ranks on 127.0.0.1 train exactly
as one process, a lost rank stops the other with its name, a killed run resumes to the uninterrupted
result, and settings that cannot hold are refused on every rank. Each rank is a `python -m minisft
finetune` process with the environment torchrun gives its workers (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), started directly, so no launcher cleans up after a dead rank: the survivors must."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minisft.checkpoint import load_checkpoint
from minisft.settings import Settings, validate
from minisft.train import checkpoints, finetune
from tests.conftest import ROOT

pytest.importorskip("torch", reason="distributed runs go through torch.distributed")

STEPS = 3


def base(data, **kw) -> dict:
    return dict(dict(model="gpt2-tiny", init="random", data=str(data),
                     responses=0, eval_freq=2, eval_iter=2, max_steps=STEPS, lr=1e-3, mask_prompt="header"), **kw)


def flags(settings: dict) -> list:
    out = []
    for k, v in settings.items():
        flag = f"--{k.replace('_', '-')}"
        out += ([flag] if v else [f"--no-{flag[2:]}"]) if isinstance(v, bool) else [flag, str(v)]
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(per_rank: list, tmp_path) -> list:
    """One `minisft finetune` process per rank (per_rank[r]: rank r's settings), as torchrun starts them."""
    port, procs = free_port(), []
    for r, settings in enumerate(per_rank):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(len(per_rank)),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1",
                   OPENBLAS_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "minisft", "finetune", *flags(settings)], cwd=ROOT,
                                      env=env, stdout=open(tmp_path / f"rank{r}.out", "w"),
                                      stderr=open(tmp_path / f"rank{r}.err", "w")))
    return procs


def wait_all(procs, tmp_path, timeout=240) -> list:
    codes = [p.wait(timeout=timeout) for p in procs]
    return codes, [(tmp_path / f"rank{r}.err").read_text() for r in range(len(procs))]


def steps(out) -> list:
    return [json.loads(line) for line in open(f"{out}/metrics.jsonl")]


def final_weights(out) -> dict:
    return load_checkpoint(checkpoints(Path(out))[-1])[0].state_dict()


def one_process(tmp_path, settings: dict) -> str:
    s = validate(Settings(**settings, out=str(tmp_path / "one")))
    finetune(s, log=lambda *_: None)
    return s.out


def assert_same_run(got, want, rtol, atol):
    a, b = steps(got), steps(want)
    assert [(r["kind"], r["step"], r["tokens_seen"]) for r in a] == [(r["kind"], r["step"], r["tokens_seen"])
                                                                      for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm", "train_loss", "val_loss"):
            if key in rb:
                np.testing.assert_allclose(ra[key], rb[key], rtol=rtol, err_msg=f"step {rb['step']} {key}")
    wa, wb = final_weights(got), final_weights(want)
    for name in wb:
        np.testing.assert_allclose(wa[name], wb[name], rtol=0, atol=atol, err_msg=name)


# float32 at the book's lr 5e-5: AdamW's first steps move each weight by about lr * sign(gradient), so
# a gradient element that nearly cancels (an embedding row summed over positions the ranks split)
# and so differs in its last float32 bits may move by up to 2 lr; at lr 1e-3 one of 3.2M weights does.
@pytest.mark.parametrize("backend, dtype, lr, tol", [("numpy", "float64", 1e-3, 1e-12),
                                                     ("numba", "float32", 5e-5, 1e-5),
                                                     ("torch", "float64", 1e-3, 1e-12)])
def test_two_gloo_ranks_train_exactly_as_one_process(tmp_path, book_data, backend, dtype, lr, tol):
    """3 steps of batch 8 (4 sequences per rank, uneven lengths, prompt masking), evaluation sharded:
    every logged loss within tol relative, every weight within tol absolute of one process."""
    settings = base(book_data, backend=backend, dtype=dtype, lr=lr)
    want = one_process(tmp_path, settings)
    procs = launch([dict(settings, out=tmp_path / "two")] * 2, tmp_path)
    codes, errs = wait_all(procs, tmp_path)
    assert codes == [0, 0], errs
    assert_same_run(tmp_path / "two", want, rtol=tol, atol=tol)
    log = (tmp_path / "rank0.out").read_text().splitlines()
    assert log[0].startswith("distributed: 2 ranks") and "over gloo" in log[0]
    assert (tmp_path / "rank1.out").read_text() == ""  # rank 0 alone reports
    recorded = json.loads((tmp_path / "two" / "settings.json").read_text())
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert recorded["world_size"] == summary["world_size"] == 2
    one_summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert len(summary["tokens_per_rank"]) == 2 and min(summary["tokens_per_rank"]) > 0
    assert sum(summary["tokens_per_rank"]) == sum(one_summary["tokens_per_rank"])


def test_a_killed_rank_stops_the_other_naming_it_and_the_run_resumes_to_the_uninterrupted_result(
        tmp_path, book_data):
    """Rank 1 is SIGKILLed after step 3 of 6 (checkpoints every 2 steps); rank 0 must exit non-zero
    within 60 s naming rank 1. The run then resumes from its last checkpoint with 2 ranks and,
    separately, with 1 (the data position is global): both end within 1e-12 of a run never killed."""
    settings = base(book_data, backend="numpy", dtype="float64", max_steps=6, ckpt_every=2, eval_freq=3)
    want = one_process(tmp_path, settings)
    run = tmp_path / "run"
    procs = launch([dict(settings, out=run)] * 2, tmp_path)
    while not (run / "metrics.jsonl").exists() or sum(r["kind"] == "step" for r in steps(run)) < 3:
        assert procs[0].poll() is None, "rank 0 stopped before the kill"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    code = procs[0].wait(timeout=60)
    err = (tmp_path / "rank0.err").read_text()
    assert code != 0
    assert "rank 1 of 2 is lost" in err, err
    assert checkpoints(run), "no checkpoint was saved before the kill"
    assert not (run / "summary.json").exists()

    shutil.copytree(run, tmp_path / "run1")
    procs = launch([dict(settings, out=run, resume=True)] * 2, tmp_path)
    codes, errs = wait_all(procs, tmp_path)
    assert codes == [0, 0], errs
    assert_same_run(run, want, rtol=1e-12, atol=1e-12)

    s = validate(Settings(**settings, out=str(tmp_path / "run1"), resume=True))
    finetune(s, log=lambda *_: None)
    assert_same_run(tmp_path / "run1", want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rank0, rank1, message", [
    (dict(batch_size=8), dict(batch_size=4), "settings differ between ranks: rank 1 has batch_size=4, rank 0 "
                                             "batch_size=8"),
    (dict(batch_size=3), dict(batch_size=3), "setting batch_size: 3 sequences cannot be split evenly over 2 ranks"),
])
def test_settings_that_cannot_hold_are_refused_on_every_rank_before_any_work(tmp_path, book_data, rank0, rank1,
                                                                              message):
    settings = dict(base(book_data, backend="numpy"), out=tmp_path / "run")
    procs = launch([dict(settings, **rank0), dict(settings, **rank1)], tmp_path)
    codes, errs = wait_all(procs, tmp_path)
    assert codes == [2, 2]
    assert all(message in e for e in errs), errs
    assert not (tmp_path / "run").exists()  # nothing was written


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_ranks_train_a_llama_folder_exactly_as_one_process(tmp_path, book_data, llama_folder, lora):
    """The Llama family through the same data-parallel path (its tokenizer on every rank), float64."""
    settings = base(book_data, model=None, init="pretrained", weights=str(llama_folder), backend="numpy",
                    dtype="float64", **(dict(lora_rank=4, lora_targets="all") if lora else {}))
    del settings["model"]
    want = one_process(tmp_path, settings)
    procs = launch([dict(settings, out=tmp_path / "two")] * 2, tmp_path)
    codes, errs = wait_all(procs, tmp_path)
    assert codes == [0, 0], errs
    if not lora:
        return assert_same_run(tmp_path / "two", want, rtol=1e-12, atol=1e-12)
    from minisft import safetensors  # a LoRA run's trained tensors: the exported adapter's
    for a, b in zip(steps(tmp_path / "two"), steps(want)):
        assert a.keys() == b.keys() and all(np.isclose(a[k], b[k], rtol=1e-12) for k in ("loss", "val_loss") if k in b)
    got, ref = (safetensors.load(Path(o) / "adapter" / "adapter_model.safetensors")[0]
                for o in (tmp_path / "two", want))
    assert got.keys() == ref.keys() and all(np.allclose(got[n], ref[n], rtol=0, atol=1e-12) for n in ref)
