"""`minisft finetune`: the book's loop step for step against PyTorch, correct accumulation, exact
resume, NaN handling and the CLI run's outputs. Runs use gpt2-tiny (the real vocabulary and
tokenizer, a tiny body) with random init on the book's data."""
import json
import subprocess
import sys

import numpy as np
import pytest

from minisft import GPT, GPTConfig, clip_grad_norm, pack_sequences
from minisft.checkpoint import load_checkpoint
from minisft.data import Loader, encode_records, load_records, split_dataset
from minisft.errors import MinisftError
from minisft.settings import Settings, validate
from minisft.train import checkpoints, finetune
from tests.conftest import ROOT
from tests.helpers import interrupted_run, quiet, read_metrics, settings


def test_twenty_book_steps_match_a_pytorch_autograd_loop(tmp_path, book_data):
    torch = pytest.importorskip("torch", reason="torch is not installed: the autograd peer needs it")
    from minisft.data import collate_padded
    from minisft.peer import TorchGPT

    s = settings(tmp_path, book_data, max_steps=20)
    finetune(s, log=quiet)
    ours = [r["loss"] for r in read_metrics(s.out) if r["kind"] == "step"]

    # The book's pipeline: padded batches from the same shuffled order, autograd, torch.optim.AdamW.
    cfg = GPTConfig.preset("gpt2-tiny")
    peer = TorchGPT(cfg)
    peer.load_numpy(GPT(cfg, seed=s.seed).state_dict())  # the same random init as the run
    opt = torch.optim.AdamW(peer.parameters(), lr=5e-5, weight_decay=0.1)
    train = encode_records(split_dataset(load_records(s.data)).train)
    loader = Loader(train, 8, shuffle=True, drop_last=True, seed=s.seed,
                    collate=lambda ex: collate_padded([e.tokens for e in ex], allowed_max_length=256))
    theirs = []
    for inputs, targets in loader:
        opt.zero_grad()
        loss = peer.loss(torch.from_numpy(inputs), torch.from_numpy(targets))
        loss.backward()
        opt.step()
        theirs.append(loss.item())
        if len(theirs) == 20:
            break
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    assert ours[-1] < ours[0]  # it learns


def test_gradient_accumulation_equals_one_big_batch(tmp_path, book_data):
    """batch 8 vs 4 micro-batches of 2: the same 8 examples per step (one shuffled order), uneven
    lengths, prompt masking; float64, per-step loss and final weights within 1e-6."""
    kw = dict(dtype="float64", mask_prompt="header", max_steps=3, lr=1e-3)
    big = settings(tmp_path / "a", book_data, batch_size=8, **kw)
    small = settings(tmp_path / "b", book_data, batch_size=2, grad_accum=4, **kw)
    finetune(big, log=quiet)
    finetune(small, log=quiet)
    a = [r for r in read_metrics(big.out) if r["kind"] == "step"]
    b = [r for r in read_metrics(small.out) if r["kind"] == "step"]
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-6)
    np.testing.assert_allclose([r["grad_norm"] for r in b], [r["grad_norm"] for r in a], rtol=1e-6)
    wa = load_checkpoint(checkpoints(tmp_path / "a" / "run")[-1])[0].state_dict()
    wb = load_checkpoint(checkpoints(tmp_path / "b" / "run")[-1])[0].state_dict()
    for name in wa:
        np.testing.assert_allclose(wb[name], wa[name], rtol=1e-6, atol=1e-12, err_msg=name)


def test_interrupted_and_resumed_equals_uninterrupted_bitwise(tmp_path, book_data, monkeypatch):
    kw = dict(max_steps=9, ckpt_every=3, eval_freq=4, schedule="cosine", warmup_steps=2, lr=1e-3, grad_clip=1.0,
              drop_rate=0.1)
    whole = settings(tmp_path / "whole", book_data, **kw)
    finetune(whole, log=quiet)

    part = settings(tmp_path / "part", book_data, **kw)
    interrupted_run(part, monkeypatch, at_step=8)  # Ctrl-C in the middle of step 8: the last checkpoint is step 6
    assert [p.name for p in checkpoints(tmp_path / "part" / "run")] == ["step-000003.h5", "step-000006.h5"]
    assert len(read_metrics(part.out)) > len([r for r in read_metrics(part.out) if r["step"] <= 6])

    finetune(validate(Settings(**{**part.to_dict(), "resume": True})), log=quiet)
    assert read_metrics(part.out, False) == read_metrics(whole.out, False)  # every step once, the same numbers
    a = load_checkpoint(checkpoints(tmp_path / "whole" / "run")[-1])
    b = load_checkpoint(checkpoints(tmp_path / "part" / "run")[-1])
    for name, w in a[0].state_dict().items():
        assert w.tobytes() == b[0].state_dict()[name].tobytes(), name
    for key in ("m", "v"):
        for name, w in a[1].state_dict()[key].items():
            assert w.tobytes() == b[1].state_dict()[key][name].tobytes(), name


def test_clipping_scales_every_gradient_to_the_max_norm_and_keeps_directions():
    model = GPT(GPTConfig(vocab_size=31, context_length=12, emb_dim=8, n_layers=2, n_heads=2), dtype="float64")
    rng = np.random.default_rng(5)
    model.forward_backward(pack_sequences([rng.integers(0, 31, 9), rng.integers(0, 31, 5)],
                                          [rng.integers(0, 31, 9), rng.integers(0, 31, 5)]))
    before = {n: model.B.to_numpy(g).copy() for n, g in model.grads.items()}
    norm = clip_grad_norm(model, 0.5)
    assert norm == pytest.approx(np.sqrt(sum(np.sum(g * g) for g in before.values())), rel=1e-12) and norm > 0.5
    after = {n: model.B.to_numpy(g) for n, g in model.grads.items()}
    assert np.sqrt(sum(np.sum(g * g) for g in after.values())) == pytest.approx(0.5 * norm / (norm + 1e-6), rel=1e-12)
    for n in before:
        np.testing.assert_allclose(after[n], before[n] * (0.5 / (norm + 1e-6)), rtol=1e-12, atol=0)
    assert clip_grad_norm(model, 10.0) == pytest.approx(0.5, rel=1e-5)  # under the limit: left alone
    np.testing.assert_array_equal(model.B.to_numpy(model.grads["wte.weight"]), after["wte.weight"])


def test_schedule_and_clipping_show_in_the_metrics(tmp_path, book_data):
    s = settings(tmp_path, book_data, max_steps=6, schedule="linear", warmup_steps=2, lr=1e-3, min_lr=1e-4,
                 grad_clip=0.5)
    finetune(s, log=quiet)
    steps = [r for r in read_metrics(s.out) if r["kind"] == "step"]
    np.testing.assert_allclose([r["lr"] for r in steps], [5e-4, 1e-3, 7.75e-4, 5.5e-4, 3.25e-4, 1e-4], rtol=1e-12)
    assert all(r["grad_norm"] > 0.5 for r in steps)  # recorded before clipping; each step was clipped


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, book_data, monkeypatch):
    s = settings(tmp_path, book_data, max_steps=8, ckpt_every=2)
    real, calls = GPT.forward_backward, []

    def poisoned(self, batch, grad_scale=None):
        calls.append(1)
        loss_sum, n = real(self, batch, grad_scale)
        return (float("nan") if len(calls) == 5 else loss_sum), n
    monkeypatch.setattr(GPT, "forward_backward", poisoned)
    with pytest.raises(MinisftError, match=r"loss became nan \(gradient norm .*\) at step 5.*step-000004\.h5"):
        finetune(s, log=quiet)
    model, _, state = load_checkpoint(checkpoints(tmp_path / "run")[-1])
    assert state["step"] == 4 and all(np.isfinite(a).all() for a in model.state_dict().values())


def test_early_stopping_keeps_the_best_checkpoint_and_exports_it(tmp_path, book_data, monkeypatch):
    import minisft.train as train
    val_losses = iter([5.0, 4.0, 4.5, 4.2, 9.9, 9.9])  # best at the 2nd evaluation, then 2 without improving
    real = train.mean_batch_loss
    calls = []

    def scripted(model, loader, num_batches, dist=None):
        calls.append(1)
        return next(val_losses) if len(calls) % 2 == 0 else real(model, loader, num_batches, dist)
    monkeypatch.setattr(train, "mean_batch_loss", scripted)
    s = settings(tmp_path, book_data, max_steps=20, eval_freq=2, early_stop=2, export="best", ckpt_every=100)
    summary = finetune(s, log=quiet)
    evals = [r for r in read_metrics(s.out) if r["kind"] == "eval"]
    assert [e["val_loss"] for e in evals] == [5.0, 4.0, 4.5, 4.2] and summary["steps"] == 7  # evals at 1, 3, 5, 7
    best, _, state = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.h5")
    assert state["step"] == 3 and state["best"] == dict(val_loss=4.0, step=3, since=0)
    exported = GPT.from_pretrained(tmp_path / "run" / "hf")
    for n, a in best.state_dict().items():
        np.testing.assert_array_equal(exported.state_dict()[n], a)


def test_weights_folder_gives_the_architecture_without_model(tmp_path, book_data):
    src = GPT(GPTConfig.preset("gpt2-tiny", n_layers=1), seed=4)
    src.save_pretrained(tmp_path / "w")
    s = validate(Settings(weights=str(tmp_path / "w"), data=str(book_data),
                          out=str(tmp_path / "run"), responses=0, eval_freq=1000, eval_iter=1, max_steps=1))
    assert s.model is None
    finetune(s, log=quiet)
    model, _, _ = load_checkpoint(checkpoints(tmp_path / "run")[-1])
    assert model.cfg.n_layers == 1 and model.cfg.emb_dim == 64


def test_a_refused_finetune_leaves_no_new_out_folder_behind_and_an_old_one_stays(tmp_path, book_data, monkeypatch):
    """Refused after the folder is locked (more batch than records; too little memory): the folders
    this run created, --out and its new parents, are gone; a folder that existed before stays."""
    data = tmp_path / "five.json"
    data.write_text(json.dumps(json.loads(book_data.read_text())[:5]))
    s = settings(tmp_path, data, out=str(tmp_path / "runs" / "new"))
    with pytest.raises(MinisftError, match="setting batch_size"):
        finetune(s, log=quiet)
    assert not (tmp_path / "runs").exists()
    (tmp_path / "old").mkdir()
    import minisft.memory as memory
    monkeypatch.setattr(memory, "available_bytes", lambda: 10**7)
    with pytest.raises(MinisftError, match="setting memory_check"):
        finetune(settings(tmp_path, book_data, out=str(tmp_path / "old")), log=quiet)
    assert (tmp_path / "old").is_dir() and not any((tmp_path / "old").iterdir())


def test_an_existing_run_is_not_overwritten_without_resume(tmp_path, book_data):
    s = settings(tmp_path, book_data, max_steps=1)
    finetune(s, log=quiet)
    with pytest.raises(MinisftError, match=r"already holds a run \(newest checkpoint step-000001.h5\); pass --resume"):
        finetune(s, log=quiet)


def test_cli_smoke_run_writes_every_output(tmp_path, book_data):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "minisft", "finetune", "--model", "gpt2-tiny", "--init", "random",
           "--data", str(book_data), "--max-steps", "4", "--eval-freq", "2",
           "--eval-iter", "2", "--responses", "2", "--max-new-tokens", "4", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Ep 1 (Step 000001): Train loss" in r.stdout and "Ep 1 (Step 000003)" in r.stdout
    assert "batch_size = 8" in r.stdout  # every resolved setting printed
    assert json.loads((out / "settings.json").read_text())["max_steps"] == 4
    kinds = [m["kind"] for m in read_metrics(out)]
    assert kinds == ["step", "eval", "step", "step", "eval", "step", "eval"]  # the last: the end's evaluation
    assert set(read_metrics(out)[0]) == {"kind", "step", "epoch", "loss", "lr", "tokens_seen", "grad_norm",
                                         "peak_rss_mb"}
    assert [p.name for p in checkpoints(out)] == ["step-000004.h5"]
    assert (out / "hf" / "model.safetensors").is_file() and (out / "hf" / "config.json").is_file()
    responses = json.loads((out / "instruction-data-with-response.json").read_text())
    test0 = json.loads(book_data.read_text())[935]
    assert len(responses) == 2 and {**test0, "model_response": responses[0]["model_response"]} == responses[0]
    assert (out / "loss-plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_cli_refuses_bad_settings_before_any_work(tmp_path):
    r = subprocess.run([sys.executable, "-m", "minisft", "finetune", "--batch-size", "0", "--out", str(tmp_path / "x")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "setting batch-size: must be at least 1" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x").exists()


def test_a_killed_run_resumes_to_the_same_result(tmp_path, book_data):
    """SIGKILL (no chance to clean up) while training: the checkpoints on disk are whole, and
    --resume reaches bitwise the result of a run that was never stopped."""
    import signal
    import time

    kw = dict(max_steps=12, ckpt_every=2, eval_freq=5)
    whole = settings(tmp_path / "whole", book_data, **kw)
    finetune(whole, log=quiet)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "minisft", "finetune", "--model", "gpt2-tiny", "--init", "random",
           "--data", str(book_data), "--max-steps", "12", "--ckpt-every", "2",
           "--eval-freq", "5", "--eval-iter", "1", "--responses", "0", "--out", str(out),
           "--backend", "numpy"]  # the engine of the uninterrupted run it is compared with bit for bit
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "step-000002.h5").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = checkpoints(out)
    assert saved and saved[-1].name != "step-000012.h5", "the run finished before it could be killed"
    r = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"resuming from {saved[-1]}" in r.stdout
    assert read_metrics(out, False) == read_metrics(whole.out, False)
    a = load_checkpoint(checkpoints(tmp_path / "whole" / "run")[-1])[0].state_dict()
    b = load_checkpoint(checkpoints(out)[-1])[0].state_dict()
    assert all(a[n].tobytes() == b[n].tobytes() for n in a)


# ---- what a run reports: its last weights' losses, its speed, its progress, its length ----------------
def cli_finetune(tmp_path, book_data, *flags) -> int:
    """`minisft finetune` in this process (so that monkeypatches apply): gpt2-tiny, random init, numpy."""
    from minisft.cli import main
    return main(["finetune", "--model", "gpt2-tiny", "--init", "random", "--data", str(book_data), "--out",
                 str(tmp_path / "run"), "--responses", "0", "--eval-iter", "1", "--backend", "numpy", "--dtype",
                 "float32", *map(str, flags)])


@pytest.mark.parametrize("eval_freq, evals", [(4, [1, 5, 7]), (3, [1, 4, 7])])
def test_the_reported_losses_are_an_evaluation_of_the_last_step(tmp_path, book_data, eval_freq, evals):
    """A 7-step run evaluates once more at its end, unless its last step just did; metrics.jsonl,
    summary.json and the done line all have that evaluation, named by its step."""
    lines = []
    s = settings(tmp_path, book_data, max_steps=7, eval_freq=eval_freq)
    summary = finetune(s, log=lines.append)
    records = [r for r in read_metrics(s.out) if r["kind"] == "eval"]
    assert [r["step"] for r in records] == evals
    last = records[-1]
    assert (summary["final_eval_step"], summary["final_train_loss"], summary["final_val_loss"]) == (
        7, last["train_loss"], last["val_loss"])
    assert f"train loss {last['train_loss']:.3f}, val loss {last['val_loss']:.3f} at step 7 (estimates on " \
           "--eval-iter batches)" in lines[-1] and lines[-1].startswith("done: 7 steps in ")
    # the evaluation reads the weights the last checkpoint holds, and leaves them so
    saved = load_checkpoint(checkpoints(tmp_path / "run")[-1])[0].state_dict()
    exported = GPT.from_pretrained(tmp_path / "run" / "hf").state_dict()
    assert all(saved[n].tobytes() == exported[n].tobytes() for n in saved)


def test_the_first_step_is_timed_apart_from_the_steady_rate(tmp_path, book_data, monkeypatch):
    """The first step (numba compiling, caches warming: here a planted 0.5 s) is reported on its
    own; tokens/s counts only the steps after it."""
    import time
    real, calls = GPT.forward_backward, []

    def slow_first(self, batch, grad_scale=None):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.5)
        return real(self, batch, grad_scale)
    monkeypatch.setattr(GPT, "forward_backward", slow_first)
    lines = []
    s = settings(tmp_path, book_data, max_steps=3)
    summary = finetune(s, log=lines.append)
    steps = [r for r in read_metrics(s.out) if r["kind"] == "step"]
    steady_s = summary["train_seconds"] - summary["first_step_seconds"]
    assert summary["first_step_seconds"] >= 0.5 and steady_s > 0
    steady_tokens = steps[-1]["tokens_seen"] - steps[0]["tokens_seen"]  # summary's seconds are rounded to 1 ms
    rate = summary["tokens_per_second"]
    assert steady_tokens / (steady_s + 2e-3) - 0.1 <= rate <= steady_tokens / (steady_s - 2e-3) + 0.1
    assert f"first step (compiling/warm-up) {summary['first_step_seconds']:.1f} s, then " \
           f"{summary['tokens_per_second']:,.0f} tokens/s" in lines[-1]


def test_the_numba_backend_says_it_compiles_before_the_first_step(tmp_path, book_data):
    lines = []
    finetune(settings(tmp_path, book_data, max_steps=1, backend="numba"), log=lines.append)
    said = [i for i, ln in enumerate(lines) if ln.startswith("numba: the first step compiles the kernels, or "
                                                             "loads them from numba's cache")]
    assert len(said) == 1 and said[0] > next(i for i, ln in enumerate(lines) if ln.startswith("model: "))
    quiet_numpy = []
    finetune(settings(tmp_path / "np", book_data, max_steps=1), log=quiet_numpy.append)
    assert not any(ln.startswith("numba:") for ln in quiet_numpy)


def test_training_off_a_terminal_writes_plain_progress_lines(tmp_path, book_data, capsys, monkeypatch):
    """Captured stderr is no terminal (a log file, CI): a plain line per interval, no carriage returns."""
    import minisft.progress
    monkeypatch.setattr(minisft.progress, "PLAIN_EVERY_S", 0.0)  # a line at every update
    assert cli_finetune(tmp_path, book_data, "--max-steps", 3) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    progress = [ln for ln in err.splitlines() if ln.startswith("finetune: ")]
    assert [ln.split(" (")[0] for ln in progress] == [f"finetune: {i}/3 steps" for i in (1, 2, 3)]
    assert "elapsed, about " in progress[0] and "; loss=" in progress[0]


def test_the_time_estimate_comes_once_after_the_first_steady_steps_and_evaluations(tmp_path, book_data, capsys):
    """Measured, never guessed: the estimate needs the first step and ESTIMATE_AFTER (3) steady ones,
    and an evaluation besides the first, so it is printed once, after step 4's evaluation; it counts
    every step and evaluation of the run (6 steps, one evaluation after each)."""
    import re
    assert cli_finetune(tmp_path, book_data, "--max-steps", 6, "--eval-freq", 1) == 0
    out = capsys.readouterr().out.splitlines()
    estimates = [i for i, ln in enumerate(out) if ln.startswith("estimated: ")]
    assert len(estimates) == 1
    assert re.fullmatch(r"estimated: first step \d+\.\d s \+ 5 steps x \d+\.\d{3} s \+ 6 evaluations x \d+\.\d{3} s = "
                        r"\d+\.\d min \(the end's export and test responses not counted\)", out[estimates[0]])
    evals = {int(m.group(1)): i for i, ln in enumerate(out) if (m := re.match(r"Ep 1 \(Step (\d+)\)", ln))}
    assert evals[4] < estimates[0] < evals[5]


@pytest.mark.parametrize("first, last, eval_freq, want", [
    (0, 232, 5, (48, 47)),  # the book's run: after steps 1, 6, ..., 231, then the last step's weights
    (0, 6, 1, (6, 5)),      # every step's, the last one's included once
    (0, 232, 1000, (2, 1)),  # step 1's and the end's
    (100, 232, 5, (28, 27)),  # a start resumed at step 100: after 101, 106, ..., 231, then the end's
    (232, 232, 5, (0, 0)),  # nothing left to run
])
def test_the_estimate_counts_the_evaluations_the_run_will_make(first, last, eval_freq, want):
    from minisft.train import evaluations_in
    assert evaluations_in(first, last, eval_freq) == want
