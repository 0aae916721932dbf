"""The command line: help, dry run, overrides and clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dpo.cli import main
from tests.helpers import build_tiny_model, write_pairs, write_recipe


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpo.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_explains_each_option():
    result = run_cli("--help")
    assert result.returncode == 0
    for option in ("RECIPE", "--set", "--dry-run"):
        assert option in result.stdout


def test_dry_run_prints_resolved_recipe_and_token_statistics(tmp_path, capsys):
    model = build_tiny_model(tmp_path / "model")
    train, eval_ = write_pairs(tmp_path / "data", train=20, eval=10)
    recipe = write_recipe(tmp_path / "r.yaml", {
        "model": {"path": str(model)},
        "data": {"train": str(train), "eval": str(eval_), "max_length": 64, "max_prompt_length": 48},
        "output": {"dir": str(tmp_path / "out")},
    })
    main([str(recipe), "--dry-run", "--set", "loss.beta=0.3"])
    printed = capsys.readouterr().out
    assert "beta: 0.3" in printed  # the resolved recipe, override applied
    assert "max_prompt_length: 48" in printed
    assert "p50" in printed and "truncated" in printed and "dropped" in printed
    assert "train examples: 20" in printed and "eval examples: 10" in printed
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_bad_recipe_is_one_clear_error_without_traceback(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {"model": {"path": "m"}, "data": {"train": "t"},
                                                "output": {"dir": "o"}, "loss": {"name": "ipo", "gamma": 1}})
    result = run_cli(str(recipe))
    assert result.returncode == 2
    assert "loss.gamma" in result.stderr and "Traceback" not in result.stderr


def test_override_of_unknown_key_is_named(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {"model": {"path": "m"}, "data": {"train": "t"}, "output": {"dir": "o"}})
    with pytest.raises(SystemExit) as info:
        main([str(recipe), "--dry-run", "--set", "train.learning_rate=1"])
    assert info.value.code == 2


def test_missing_data_file_is_a_clear_error(tmp_path):
    model = build_tiny_model(tmp_path / "model")
    recipe = write_recipe(tmp_path / "r.yaml", {"model": {"path": str(model)},
                                                "data": {"train": str(tmp_path / "absent.jsonl")},
                                                "output": {"dir": str(tmp_path / "out")}})
    result = run_cli(str(recipe), "--dry-run")
    assert result.returncode == 2
    assert "absent.jsonl" in result.stderr and "Traceback" not in result.stderr


def test_output_without_a_reader_is_dropped_not_raised(tmp_path):
    import os

    from dpo.cli import ForgivingStream

    read, write = os.pipe()
    os.close(read)  # the reader is gone, as `| tee` is after Ctrl-C
    stream = open(write, "w", buffering=1)
    forgiving = ForgivingStream(stream)
    assert forgiving.write("a line\n") == 7 and forgiving.gone
    forgiving.write("more\n")
    forgiving.flush()
    stream.write("buffered text\n")
    stream.flush()  # the descriptor now points at /dev/null: nothing fails later, at exit either
    stream.close()


# ------------------------------------------------------------------------------ help, version, exit codes


def invoke(*args: str):
    from typer.testing import CliRunner

    from dpo.cli import app

    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("args", [[], ["--help"], ["-h"]])
def test_bare_command_help_and_h_print_the_same_page_of_every_command_with_an_example(args):
    from dpo.cli import app, command_example

    result = invoke(*args)
    assert result.exit_code == 0
    assert result.output == invoke("--help").output
    import typer.main

    commands = typer.main.get_group(app).commands
    assert {"train", "cache", "merge", "score", "compare", "plot"} <= set(commands)
    for name, command in commands.items():
        example = command_example(command)
        assert example and example.startswith("dpo-train"), name  # every command has an example
        assert f"  {name} " in result.output and f"e.g. {example}" in result.output
    assert "Usage: dpo-train RECIPE" in result.output and "--version" in result.output


def test_a_command_help_takes_h_and_a_recipe_path_defaults_to_train():
    train = invoke("train", "-h")
    assert train.exit_code == 0 and "--dry-run" in train.output and "RECIPE" in train.output
    assert invoke("some-recipe.yaml", "-h").output == train.output  # `dpo-train RECIPE -h` is train's help


def test_compare_help_gives_compare_keys_as_its_example():
    result = invoke("compare", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "generation.seed" in text and "models.1.run" in text
    assert "loss.beta" not in text and "train.max_steps" not in text


def test_version_names_every_library_and_cuda():
    result = invoke("--version")
    assert result.exit_code == 0
    lines = dict(line.split(None, 1) for line in result.output.strip().splitlines())
    for name in ("dpo-train", "python", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "triton",
                 "CUDA"):
        assert lines.get(name), name
    import torch

    assert lines["torch"] == torch.__version__
    assert lines["CUDA"].startswith("available" if torch.cuda.is_available() else "not available")


def test_an_unknown_option_is_a_usage_error():
    assert invoke("train", "r.yaml", "--no-such-option").exit_code == 2


def test_a_compare_file_given_to_the_trainer_names_the_compare_command(tmp_path, capsys):
    compare = write_recipe(tmp_path / "c.yaml", {"models": [{"name": "a", "path": "m"}], "reward_model": "r",
                                                 "prompts": {"path": "p.jsonl"}, "output": "o"})
    with pytest.raises(SystemExit) as info:
        main([str(compare)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "is a compare file" in err and f"dpo-train compare {compare}" in err


def test_a_training_recipe_given_to_compare_names_the_train_command(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", {"model": {"path": "m"}, "data": {"train": "t"}, "output": {"dir": "o"}})
    with pytest.raises(SystemExit) as info:
        main(["compare", str(recipe)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "is a training recipe" in err and f"dpo-train {recipe}" in err
