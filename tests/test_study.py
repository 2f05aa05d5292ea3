"""`minisft study OP`: every stage printed with its shape and formulas, every gradient checked against
finite differences (float64, error <= 1e-7), and a broken backward reported as a failure."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minisft import study as S
from minisft.backends import numpy_backend as nb
from minisft.cli import main

ERROR_DIGITS = re.compile(r"(?<=error )([0-9.e+-]+)")
ERROR = re.compile(r"finite differences(?:: d\S+)?:?\s+error ([0-9.e+-]+)")


def run_study(capsys, *args):
    rc = main(["study", *args])
    return rc, capsys.readouterr().out


@pytest.mark.parametrize("op", S.OPS)
def test_every_op_prints_every_stage_forward_and_backward_and_every_check_passes(capsys, op):
    rc, out = run_study(capsys, op)
    assert rc == 0, out
    s = S.study(op)  # the same default seed: the same stages and shapes
    forward, backward = out.split("\nbackward")
    for i, st in enumerate(s.stages, 1):
        assert re.search(rf"\[{i}\] +{re.escape(st.out)} +{re.escape(S._shape(s.values[st.out]))} +"
                         rf"{re.escape(st.forward)}\n", forward), st.out
        assert re.search(rf"\[{i}\] +{re.escape(st.out)} +backward   {re.escape(st.backward)}\n", backward), st.out
    errors = [float(e) for e in ERROR.findall(out)]
    # one per stage input, plus one per leaf for the kernel itself
    assert len(errors) == sum(len(st.ins) for st in s.stages) + len(s.leaves)
    assert max(errors) <= 1e-7
    assert f"{len(s.checks)} of {len(s.checks)} checks passed" in out and "FAILED" not in out


def test_attention_shows_each_named_intermediate_per_packed_sequence(capsys):
    rc, out = run_study(capsys, "attention", "--lengths", "4,3", "--heads", "2")
    assert rc == 0
    per_head, per_score = r"\(2, 4, 3\) \| \(2, 3, 3\)", r"\(2, 4, 4\) \| \(2, 3, 3\)"
    for name, shape in [("q", per_head), ("k", per_head), ("v", per_head), ("scores", per_score),
                        ("p", per_score), ("y", per_head), ("out", r"\(7, 6\)")]:
        assert re.search(rf"\] +{name} +{shape} +{name} = ", out), name
    for grad, shape in [("dy", per_head), ("dv", per_head), ("dp", per_score), ("dscores", per_score),
                        ("dq", per_head), ("dk", per_head), ("dqkv", r"\(7, 18\)")]:
        assert re.search(rf"\n +{grad} +{shape} +finite differences: error", out), grad
    assert re.search(r"\n +dout +\(7, 6\) +random: the gradient arriving from above\n", out)
    assert "dp = dy @ vT;  dv = pT @ dy" in out
    assert "dscores = p * (dp - sum_j(dp * p))" in out


def test_seed_lengths_and_heads_change_the_inputs_and_shapes(capsys):
    rc, out = run_study(capsys, "attention", "--lengths", "2,5,1", "--heads", "3", "--head-dim", "2")
    assert rc == 0
    assert "(3, 2, 2) | (3, 5, 2) | (3, 1, 2)" in out and re.search(r"\n  qkv +\(8, 18\)\n", out)
    _, a = run_study(capsys, "linear", "--seed", "1")
    _, b = run_study(capsys, "linear", "--seed", "2")
    assert a != b


def test_a_broken_kernel_backward_is_reported_with_a_nonzero_exit(capsys, monkeypatch):
    good = nb.NumpyBackend.attention_backward
    monkeypatch.setattr(nb.NumpyBackend, "attention_backward", lambda self, *a: 1.01 * good(self, *a))
    rc, out = run_study(capsys, "attention")
    assert rc == 1
    assert re.search(r"backward = stages: dqkv +error [0-9.e+-]+ \(<= 1e-12\) FAILED", out)
    assert re.search(r"backward vs finite differences: dqkv +error [0-9.e+-]+ \(<= 1e-07\) FAILED", out)
    assert ("FAILED: attention_forward/attention_backward backward = stages: dqkv, "
            "attention_forward/attention_backward backward vs finite differences: dqkv\n") in out
    assert "\nfirst failure in backward order: attention_forward/attention_backward backward = stages: dqkv " in out
    assert re.search(r"\n  dk head 1 +kernel vs stages: error \S+ FAILED  \(1\.01 times the right one", out)


def test_a_broken_stage_backward_is_caught_at_that_stage(capsys, monkeypatch):
    # softmax backward without the row term: dscores = p * dp. The stage p is where it shows.
    monkeypatch.setattr(nb, "softmax_backward", lambda dp, p: p * dp)
    rc, out = run_study(capsys, "attention")
    assert rc == 1
    assert re.search(r"\n +dscores .*finite differences: error [0-9.e+-]+ FAILED", out)
    assert re.search(r"\n +dp .*finite differences: error [0-9.e+-]+ ok", out)  # the stages after it are fine
    assert "backward vs finite differences: dqkv" in out.split("FAILED:")[-1]


def test_a_broken_layernorm_backward_fails_the_block_study(capsys, monkeypatch):
    good = nb.NumpyBackend.layernorm_backward

    def no_mean_term(self, dout, x, w, mean, rstd):  # forgets that the mean depends on x
        dx, dw, db = good(self, dout, x, w, mean, rstd)
        return dx + rstd[:, None] * (dout * w).mean(axis=-1, keepdims=True), dw, db
    monkeypatch.setattr(nb.NumpyBackend, "layernorm_backward", no_mean_term)
    rc, out = run_study(capsys, "block")
    assert rc == 1
    assert re.search(r"\n +dx .*finite differences: error [0-9.e+-]+ FAILED", out)  # stage ln1, input x


def test_study_runs_without_importing_torch():
    code = ("import sys; from minisft.cli import main; rc = main(['study', 'attention']); "
            "assert 'torch' not in sys.modules; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
@pytest.mark.parametrize("op", ["attention", "cross-entropy", "model"])
def test_torch_shows_autograd_gradients_beside_ours(capsys, op):
    rc, out = run_study(capsys, op, "--torch")
    assert rc == 0, out
    torch_part = out.split("PyTorch autograd on the same inputs and output gradient")[1]
    s = S.study(op)
    for n in s.leaves:
        assert re.search(rf"\n  d{re.escape(n)} .*ours vs autograd: error [0-9.e+-]+ \(<= 1e-10\) ok", torch_part), n
    if op == "attention":
        for n in ("q", "k", "v", "scores", "p"):
            assert re.search(rf"\n  d{n} .*ours vs autograd", torch_part), n


def test_bad_lengths_are_one_clear_line_and_exit_2(capsys):
    assert main(["study", "attention", "--lengths", "4,x"]) == 2
    assert capsys.readouterr().err.strip() == ("minisft: error: study: --lengths takes comma-separated "
                                               "integers like 4,3, not '4,x'")
    assert main(["study", "attention", "--lengths", "4,0"]) == 2
    assert "--lengths must be positive" in capsys.readouterr().err


def test_fd_error_measures_a_wrong_gradient():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4))
    dout = rng.normal(size=(3, 4))
    exact = S.fd_error(np.sin, [x], 0, dout * np.cos(x), dout, rng)
    wrong = S.fd_error(np.sin, [x], 0, dout * np.cos(x) * 1.001, dout, rng)
    assert exact <= 1e-9 and 9e-4 <= wrong <= 1.1e-3


BACKPROP_MD = Path(__file__).resolve().parents[1] / "docs" / "backprop.md"


def test_backprop_md_names_only_functions_the_numpy_backend_defines():
    """The links name symbols, not line numbers, so that editing the backend cannot make them stale."""
    text = BACKPROP_MD.read_text(encoding="utf-8")
    source = Path(nb.__file__).read_text(encoding="utf-8")
    names = re.findall(r"\[`(\w+)`\]\(\.\./backends/numpy_backend\.py\)", text)
    assert len(set(names)) >= 10
    assert "numpy_backend.py#L" not in text
    for name in names:
        assert re.search(rf"^\s*def {name}\(", source, re.M), f"backprop.md names {name}, not in numpy_backend.py"


def test_every_code_reference_of_backprop_md_resolves():
    """tests/FILE.py::NAME names a test that FILE defines; every repository path it quotes or links exists."""
    root, text = BACKPROP_MD.parents[1], BACKPROP_MD.read_text(encoding="utf-8")
    tests = re.findall(r"`(tests/\w+\.py)::(\w+)`", text)
    assert len(tests) >= 2
    for path, name in tests:
        assert re.search(rf"^def {name}\(", (root / path).read_text(encoding="utf-8"), re.M), f"{path}::{name}"
    quoted = re.findall(r"`((?:minisft|tests|backends|docs)/[\w/.]+\.\w+)", text)
    linked = [str((BACKPROP_MD.parent / p).resolve().relative_to(root)) for p in re.findall(r"\]\(([^)#:]+)", text)]
    assert len(quoted) >= 5 and len(linked) >= 10
    for path in quoted + linked:
        assert (root / path).exists(), path


def test_backprop_md_gradient_check_example_runs_and_passes(capsys):
    example = re.search(r"```python\n(.*?)```", BACKPROP_MD.read_text(encoding="utf-8"), re.S).group(1)
    exec(example, {})
    assert float(capsys.readouterr().out.split()[0]) <= 1e-7


def test_readme_shows_real_output_of_the_study(capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    shown = re.search(r"From `minisft study attention --no-values`.*?```\n(.*?)```", readme, re.S).group(1)
    rc, out = run_study(capsys, "attention", "--no-values")
    assert rc == 0
    # The measured errors' digits move with the CPU and its BLAS; the lines, the stages and the bound do not.
    def stable(text):
        return [ERROR_DIGITS.sub("<e>", line) for line in text.splitlines() if line != "..."]
    lines = stable(shown)
    assert len(lines) >= 8 and all(line in stable(out) for line in lines)
    assert all(float(e) <= 1e-7 for e in ERROR_DIGITS.findall(shown))  # what the README promises, ...
    assert all(float(e) <= 1e-7 for e in ERROR_DIGITS.findall(out))  # ... and what the run measured


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
@pytest.mark.parametrize("seed", range(3))
def test_adamw_agrees_with_torch_optim_adamw_to_1e10_in_float64_at_every_step(capsys, seed):
    rc, out = run_study(capsys, "adamw", "--seed", str(seed))
    assert rc == 0, out
    errors = [float(e) for e in re.findall(r"p = torch\.optim\.AdamW +error (\S+) \(<= 1e-10\) ok", out)]
    assert len(errors) == S.ADAMW_STEPS and max(errors) <= 1e-10
    assert "bias correction" in out and "decoupled weight decay" in out
    l2 = [float(e) for e in re.findall(r"its p differs by (\S+)\)", out)]
    assert min(l2) > 1e-6  # Adam with L2 is measurably another optimizer: the check can tell them apart


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
@pytest.mark.parametrize("args", [[], ["--seed", "1", "--lengths", "2,5,3"]])
def test_a_training_step_agrees_with_pytorch_end_to_end_to_1e10_in_float64(capsys, args):
    rc, out = run_study(capsys, "step", *args)
    assert rc == 0, out
    for t in range(1, S.TRAIN_STEPS + 1):
        part = out.split(f"\nstep {t}\n")[1]
        for what in ("forward, the loss", "backward, every gradient", "update, every weight"):
            assert re.search(rf"  {what} .*ours vs PyTorch error \S+ \(<= 1e-10\) ok", part), (t, what)
    assert f"{3 * S.TRAIN_STEPS} of {3 * S.TRAIN_STEPS} checks passed" in out


def test_a_planted_adamw_mistake_fails_study_step(capsys, monkeypatch):
    good = nb.NumpyBackend.adamw_step

    def l2_not_decoupled(self, p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
        good(self, p, g + weight_decay * p, m, v, lr, beta1, beta2, eps, 0.0, step)  # Adam with L2
    monkeypatch.setattr(nb.NumpyBackend, "adamw_step", l2_not_decoupled)
    rc, out = run_study(capsys, "step")
    assert rc == 1 and re.search(r"update, every weight .* FAILED", out)
    assert re.search(r"step 1\n  forward, the loss .* ok", out)  # the forward and backward of step 1 are right
