"""README.md's command lines are real: every `minisft` command in its bash blocks parses with the
real argument parser, and every `finetune` command passes all of its checks as a dry run (settings,
data, memory plan), offline. The commands whose output the README shows are run in full where they
are shown: tests/test_data_cmd.py (data), tests/test_serve.py (serve, curl, the openai client),
tests/test_study.py (study); CI runs the two quick-start commands."""
import re
import shlex

import pytest

from minisft.cli import build_parser, main
from minisft.pretrained import LLAMA_HUB
from tests.conftest import ROOT


def readme_commands() -> list:
    """Every `minisft ...` command (also `torchrun ... -m minisft ...`) in README.md's bash blocks, as
    the argument list after `minisft`, continuation lines joined and comments dropped."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if "minisft" not in line:  # a curl's JSON body, say, need not split as shell words line by line
                continue
            words = shlex.split(line, comments=True)
            starts = [i for i, w in enumerate(words) if w == "minisft" and (i == 0 or words[i - 1] in ("-m", "&&"))]
            commands += [words[i + 1:] for i in starts]
    return commands


COMMANDS = readme_commands()
FINETUNE = [c for c in COMMANDS if c[0] == "finetune"]


def test_the_readme_shows_commands_of_every_kind():
    assert {c[0] for c in COMMANDS} >= {"finetune", "generate", "chat", "serve", "eval", "judge", "export", "data",
                                         "bench", "study"}
    assert len(FINETUNE) >= 8


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_every_minisft_command_in_the_readme_parses(argv):
    build_parser().parse_args(argv)  # an unknown flag or a bad value exits (SystemExit) and fails the test


@pytest.mark.parametrize("argv", FINETUNE, ids=" ".join)
def test_every_finetune_command_in_the_readme_passes_its_checks_as_a_dry_run(argv, tmp_path, monkeypatch, capsys):
    """The settings validate, the data loads (the default is the bundled copy: no download), the memory
    plan is printed with its verdict; a plan that does not fit here is refused (exit 2) saying so."""
    if "cuda" in argv:
        pytest.skip("the command runs on CUDA, which this machine does not have")
    if any(w in LLAMA_HUB for w in argv):
        pytest.skip("the dry run reads the model's tokenizer from the hub; tests/test_llama_pretrained.py "
                    "downloads a preset from a loopback hub, tests/test_llama_train.py runs a Llama folder")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MINISFT_CACHE_DIR", str(tmp_path / "cache"))
    code = main([*argv, "--dry-run"] if "--dry-run" not in argv else argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if "does not fit" in out:
        assert code == 2 and "setting memory_check" in err
    else:
        assert code == 0, err
        assert re.search(r"^fits: [0-9.]+ GB of [0-9.]+ GB available", out, re.M)
    assert not (tmp_path / "runs").exists()  # a dry run writes no run folder
