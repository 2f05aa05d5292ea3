"""finetune settings: defaults are the book's recipe; TOML then flags override; bad values are refused
before any work starts, naming the setting."""
import argparse

import pytest

from minisft.errors import MinisftError
from minisft.settings import BOOK_DATA_URL, Settings, add_arguments, resolve


def parse(*argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return resolve(p.parse_args(list(argv)))


def test_defaults_are_the_book_recipe():
    s = parse()
    assert (s.model, s.init, s.data, s.prompt_style, s.mask_prompt) == ("gpt2-medium", "pretrained", BOOK_DATA_URL,
                                                                         "alpaca", "none")
    assert (s.epochs, s.batch_size, s.lr, s.weight_decay, s.decay) == (2, 8, 5e-5, 0.1, "all")
    assert (s.eval_freq, s.eval_iter, s.seed, s.shuffle, s.grad_clip, s.grad_accum) == (5, 5, 123, True, None, 1)
    assert (s.schedule, s.warmup_steps, s.max_length) == ("constant", 0, 1024)


def test_toml_then_flags(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('model = "gpt2-tiny"\ninit = "random"\nbatch-size = 4\nlr = 1\nshuffle = false\n'
                   'schedule = "cosine"\n')
    s = parse("--config", str(cfg), "--batch-size", "2", "--no-shuffle")
    assert (s.model, s.batch_size, s.lr, s.shuffle, s.schedule) == ("gpt2-tiny", 2, 1.0, False, "cosine")
    assert parse("--config", str(cfg), "--shuffle").shuffle is True


@pytest.mark.parametrize("argv,message", [
    (["--lr=-1e-4"], "setting lr: must not be negative"),
    (["--batch-size", "0"], "setting batch-size: must be at least 1"),
    (["--data", "/no/such/file.json"], "setting data: /no/such/file.json is not a file"),
    (["--weights", "/no/such/dir"], "setting weights: /no/such/dir does not exist"),
    (["--grad-clip", "0"], "setting grad-clip: must be positive"),
    (["--dtype", "bfloat16", "--backend", "numpy"], "setting dtype: bfloat16 needs --backend numba, torch or auto"),
    (["--min-lr", "1", "--lr", "0.1"], "setting min-lr: 1.0 is above lr 0.1"),
])
def test_bad_settings_are_refused_by_name(argv, message):
    with pytest.raises(MinisftError, match=message):
        parse(*argv)


def test_a_preset_without_pretrained_weights_is_refused_suggesting_init_random(tmp_path, book_data):
    """gpt2-tiny is a preset (a shape) with no OpenAI weights: one line saying so, exit 2, no folder."""
    from tests.helpers import run_cli
    r = run_cli("finetune", "--model", "gpt2-tiny", "--data", book_data, "--out", tmp_path / "run")
    assert r.returncode == 2 and r.stderr == (
        "minisft: error: setting model: no pretrained weights exist for gpt2-tiny (the downloads are gpt2-small, "
        "gpt2-medium, gpt2-large, gpt2-xl, smollm2-135m, smollm2-135m-instruct, smollm2-360m, "
        "smollm2-360m-instruct, smollm2-1.7b, smollm2-1.7b-instruct, qwen2.5-0.5b, qwen2.5-0.5b-instruct, "
        "qwen2.5-1.5b, qwen2.5-1.5b-instruct, qwen3-0.6b, llama-3.2-1b, llama-3.2-1b-instruct); pass --init "
        "random to train it from a random init\n")
    assert not (tmp_path / "run").exists()
    assert parse("--model", "gpt2-tiny", "--init", "random").model == "gpt2-tiny"


@pytest.mark.parametrize("line,message", [
    ('prompt-style = "vicuna"', "setting prompt-style: 'vicuna' is not one of alpaca, phi3, chatml"),
    ('model = "gpt3"', "setting model: 'gpt3' is not one of gpt2-small, gpt2-medium"),
    ('backend = "jax"', "setting backend: 'jax' is not one of auto, numpy, numba, torch"),
])
def test_a_toml_value_outside_its_choices_is_refused_by_name(tmp_path, line, message):
    cfg = tmp_path / "run.toml"
    cfg.write_text(line + "\n")
    with pytest.raises(MinisftError, match=message):
        parse("--config", str(cfg))


def test_a_flag_outside_its_choices_is_refused_by_argparse_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as e:
        parse("--prompt-style", "vicuna")
    assert e.value.code == 2
    assert "argument --prompt-style: invalid choice: 'vicuna' (choose from alpaca, phi3, chatml)" in \
        capsys.readouterr().err.replace("'alpaca', 'phi3', 'chatml'", "alpaca, phi3, chatml")


def test_demo_is_the_offline_first_run_and_flags_still_override():
    s = parse("--demo", "--lr", "2e-3")
    assert (s.model, s.init, s.backend, s.lr, s.data) == ("gpt2-tiny", "random", "numba", 2e-3, BOOK_DATA_URL)


def test_bad_toml_is_refused_by_name(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("batch_size = 'eight'\n")
    with pytest.raises(MinisftError, match=r"bad.toml: setting 'batch_size' must be int, got 'eight'"):
        parse("--config", str(cfg))
    cfg.write_text("batchsize = 8\n")
    with pytest.raises(MinisftError, match="unknown setting 'batchsize'"):
        parse("--config", str(cfg))
    cfg.write_text("lr = [\n")
    with pytest.raises(MinisftError, match="not valid TOML"):
        parse("--config", str(cfg))
    with pytest.raises(MinisftError, match="does not exist"):
        parse("--config", str(tmp_path / "missing.toml"))


def test_every_setting_has_a_flag_whose_help_states_its_default_and_choices():
    p = argparse.ArgumentParser()
    add_arguments(p)
    actions = {a.dest: a for a in p._actions}
    assert set(Settings().to_dict()) <= set(actions)
    for name, default in Settings().to_dict().items():
        a = actions[name]
        assert a.help and "default" in a.help, name
        if isinstance(default, (int, float, str)) and not isinstance(default, bool) and name != "model":
            assert f"default: {default}" in a.help, name
    assert actions["mask_prompt"].choices == ("none", "input", "header", "assistant")
    assert actions["backend"].choices == ("auto", "numpy", "numba", "torch")
    help_text = p.format_help()
    assert "--lr LR" in help_text and "(default: 5e-05)" in help_text


def subcommands(parser, prefix="minisft"):
    """(name, parser) of every command and subcommand under a parser, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from subcommands(sub, f"{prefix} {name}")


def test_every_subcommand_has_a_description_and_every_option_help_that_shows_its_default():
    from minisft.cli import build_parser

    commands = dict(subcommands(build_parser()))
    assert {"minisft finetune", "minisft chat", "minisft data clean", "minisft data convert"} <= set(commands)
    for name, p in commands.items():
        assert p.description, f"{name}: no description"
        formatter = p._get_formatter()
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert a.help, f"{name} {a.dest}: no help"
            if "_" in a.dest:  # the description names a setting by its flag, never by its Python name
                assert a.dest not in p.description, f"{name}: the description says {a.dest}, not its flag"
            shown = formatter._expand_help(a)
            if a.default not in (None, False, [], argparse.SUPPRESS):
                assert "default" in shown, f"{name} {a.dest}: the default {a.default!r} is not shown: {shown!r}"
