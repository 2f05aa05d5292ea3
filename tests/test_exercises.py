"""docs/exercises/: each hands out a numpy backward with lines blanked (`...`, TODO). With the blanks
filled from the reference kernel it passes `minisft study OP --kernel`, so every exercise is solvable;
as handed out, or with one line wrong, it fails, and the failure names where."""
import ast
import inspect
import re
import textwrap
from pathlib import Path

import pytest

from minisft.backends import numpy_backend as nb
from minisft.cli import main

EXERCISES = Path(__file__).resolve().parents[1] / "docs" / "exercises"
# (file, function = the numpy backward it stands in for, the study that checks it), in the doc's order
CASES = [("1_gelu.py", "gelu_backward", "gelu"), ("2_layernorm.py", "layernorm_backward", "layernorm"),
         ("3_attention.py", "attention_backward", "attention"), ("4_cross_entropy.py", "head_loss", "cross-entropy")]
BLANK = re.compile(r"^(\s*)(\S.*?)\s*(=|\+=|-=)\s*\.\.\.\s*# TODO", re.M)


def reference_statements(name) -> list:
    """The reference kernel's assignments: (target, operator, the statement on one line), in order."""
    source = textwrap.dedent(inspect.getsource(getattr(nb.NumpyBackend, name)))
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            op = "=" if isinstance(node, ast.Assign) else ast.unparse(node).split(ast.unparse(target), 1)[1].split()[0]
            out.append((node.lineno, ast.unparse(target), op, ast.unparse(node)))
    return [s[1:] for s in sorted(out)]


def solved(text, name) -> str:
    """The exercise with every blank filled by the reference's statement of the same target, in order."""
    refs, lines = reference_statements(name), []
    for line in text.splitlines():
        m = BLANK.match(line)
        if m:
            indent, target, op = m.groups()
            k = next(i for i, (t, o, _) in enumerate(refs) if (t, o) == (target, op))
            line = indent + refs[k][2]
            refs = refs[k + 1:]
        lines.append(line)
    return "\n".join(lines) + "\n"


def study(capsys, op, path, name):
    rc = main(["study", op, "--kernel", f"{path}:{name}", "--no-values"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize("file, name, op", CASES, ids=[c[2] for c in CASES])
def test_an_exercise_fails_as_handed_out_and_passes_with_its_blanks_filled_from_the_reference(
        capsys, tmp_path, file, name, op):
    text = (EXERCISES / file).read_text(encoding="utf-8")
    assert len(BLANK.findall(text)) >= 2 and not BLANK.search(solved(text, name))
    rc, out, err = study(capsys, op, EXERCISES / file, name)
    assert rc == 1 and len(err.strip().splitlines()) == 1 and name in err
    answer = tmp_path / file
    answer.write_text(solved(text, name), encoding="utf-8")
    rc, out, err = study(capsys, op, answer, name)
    assert rc == 0, out + err
    assert "FAILED" not in out and "first failure" not in out


def test_a_wrong_line_fails_and_names_the_stage_term_it_lacks(capsys, tmp_path):
    text = solved((EXERCISES / "2_layernorm.py").read_text(encoding="utf-8"), "layernorm_backward")
    wrong = text.replace("dxhat - dxhat.mean(axis=-1, keepdims=True) - ", "dxhat - ")  # the mean's path forgotten
    assert wrong != text
    (tmp_path / "ln.py").write_text(wrong, encoding="utf-8")
    rc, out, err = study(capsys, "layernorm", tmp_path / "ln.py", "layernorm_backward")
    assert rc == 1
    assert "first failure in backward order: layernorm_forward/layernorm_backward backward = stages: dx" in out
    assert "the kernel's gradient is the stages' without stage xc's term into dmean" in out


def test_a_transposed_line_of_attention_fails_on_the_k_heads_alone(capsys, tmp_path):
    text = solved((EXERCISES / "3_attention.py").read_text(encoding="utf-8"), "attention_backward")
    wrong = text.replace("dk = dqk.transpose(0, 2, 1) @ q", "dk = dqk @ q")
    assert wrong != text
    (tmp_path / "att.py").write_text(wrong, encoding="utf-8")
    rc, out, err = study(capsys, "attention", tmp_path / "att.py", "attention_backward")
    assert rc == 1
    for head in (0, 1):
        assert re.search(rf"\n  dk head {head} +kernel vs stages: error \S+ FAILED", out)
        assert re.search(rf"\n  dq head {head} +kernel vs stages: error \S+ ok", out)
        assert re.search(rf"\n  dv head {head} +kernel vs stages: error \S+ ok", out)


@pytest.mark.parametrize("spec, message", [
    ("nofile.py:gelu_backward", "study: --kernel: no file nofile.py"),
    ("{ex}:gelu_forward", "'gelu_forward' is not a backward of the numpy backend"),
    ("{ex}", "--kernel takes FILE:FUNCTION"),
    ("{ex}:layernorm_backward", "defines no function layernorm_backward"),
    ("{bad}:gelu_backward", "has gelu_backward(dy); the reference takes (dy, x)"),
    ("{ex}:attention_backward", None),  # loads, but study gelu never runs it
])
def test_a_kernel_that_cannot_stand_in_is_one_clear_line_and_exit_2(capsys, tmp_path, spec, message):
    bad = tmp_path / "bad.py"
    bad.write_text("def gelu_backward(dy):\n    return dy\n", encoding="utf-8")
    spec = spec.format(ex=EXERCISES / "1_gelu.py", bad=bad)
    if message is None:
        spec = f"{EXERCISES / '3_attention.py'}:attention_backward"
        message = "study: gelu never runs attention_backward"
    assert main(["study", "gelu", "--kernel", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
