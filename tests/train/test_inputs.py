"""Inputs that do not load end in one message naming the recipe key, the path and what to do, and leave no
output folder behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dpo.data import DataError
from dpo.model import ModelError
from dpo.recipe import load_recipe
from dpo.train.inputs import check_inputs, looks_like_hub_id
from tests.helpers import build_tiny_model, write_pairs, write_recipe


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "dpo.cli", *args], capture_output=True, text=True, timeout=180,
                          cwd=cwd, env=env)


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("inputs")
    model = build_tiny_model(tmp / "model")
    train, eval_ = write_pairs(tmp / "data", train=16, eval=8)
    return {"model": model, "train": train, "eval": eval_, "tmp": tmp}


def recipe_with(tmp_path: Path, parts: dict[str, Path], **changes) -> Path:
    tree = {"model": {"path": str(parts["model"])},
            "data": {"train": str(parts["train"]), "eval": str(parts["eval"]), "max_length": 64,
                     "max_prompt_length": 48},
            "train": {"max_steps": 1, "batch_size": 4},
            "output": {"dir": str(tmp_path / "out")}}
    for section, values in changes.items():
        tree[section] = {**tree.get(section, {}), **values}
    return write_recipe(tmp_path / "recipe.yaml", tree)


def one_message(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    return errors[0]


def test_the_shipped_placeholder_model_path_is_one_message_in_dry_run(tmp_path):
    recipe = Path("recipes/llama3-8b-qlora-24gb.yaml").resolve()
    result = run_cli(str(recipe), "--dry-run", "--set", f"output.dir={tmp_path / 'out'}")
    message = one_message(result)
    assert "model.path: /path/to/Meta-Llama-3-8B-Instruct does not exist" in message
    assert "set model.path to a local Hugging Face model folder" in message and "--set model.path=" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, value, expected", [
    ("model.path", "{tmp}/no-such-model", "model.path: {tmp}/no-such-model does not exist"),
    ("model.path", "{tmp}/empty-folder", "has no config.json"),
    ("data.train", "{tmp}/absent.jsonl", "data.train: {tmp}/absent.jsonl does not exist"),
    ("data.eval", "{tmp}/absent-eval.jsonl", "data.eval: {tmp}/absent-eval.jsonl does not exist"),
    ("reference.adapter", "{tmp}/no-adapter", "reference.adapter: {tmp}/no-adapter does not exist"),
    ("reference.model_path", "{tmp}/no-reference", "reference.model_path: {tmp}/no-reference does not exist"),
])
def test_a_missing_input_is_one_message_naming_the_key_and_no_output_folder_is_created(tmp_path, parts, key, value,
                                                                                          expected, capsys):
    from dpo.cli import main

    (tmp_path / "empty-folder").mkdir()
    section, name = key.split(".")
    recipe = recipe_with(tmp_path, parts, **{section: {name: value.format(tmp=tmp_path)}})
    with pytest.raises(SystemExit) as info:  # any other exception would be a traceback
        main([str(recipe)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0])
    assert expected.format(tmp=tmp_path) in errors[0] and "set" in errors[0]  # says what to do
    assert not (tmp_path / "out").exists()


def test_a_folder_without_a_tokenizer_names_the_key_and_what_is_missing(tmp_path, parts):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(parts["model"], model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    recipe = load_recipe(recipe_with(tmp_path, parts, model={"path": str(model)}))
    with pytest.raises(ModelError, match=r"model.path: cannot load the tokenizer from .*tokenizer's files"):
        check_inputs(recipe)


def test_weights_that_do_not_load_leave_no_output_folder(tmp_path, parts, capsys):
    import shutil

    from dpo.cli import main

    model = tmp_path / "model"
    shutil.copytree(parts["model"], model)
    (model / "model.safetensors").write_bytes(b"not safetensors")  # passes the cheap checks, fails to load
    recipe = recipe_with(tmp_path, parts, model={"path": str(model)},
                         reference={"cache_dir": str(tmp_path / "cache")}, data={"cache_dir": str(tmp_path / "tok")})
    with pytest.raises(SystemExit):
        main([str(recipe)])
    assert "model.path" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # the folder this run created went with what it held


def test_check_inputs_accepts_a_good_recipe_and_reports_data_errors_as_data_errors(tmp_path, parts):
    check_inputs(load_recipe(recipe_with(tmp_path, parts)))
    with pytest.raises(DataError, match="data.chat_template"):
        check_inputs(load_recipe(recipe_with(tmp_path, parts, data={"chat_template": str(tmp_path / "t.jinja")})))


def test_hub_ids_are_left_to_the_loader():
    assert looks_like_hub_id("meta-llama/Llama-3.2-1B") and looks_like_hub_id("gpt2")
    assert not looks_like_hub_id("/path/to/model") and not looks_like_hub_id("./model")
    assert not looks_like_hub_id("runs/x/model") and not looks_like_hub_id("pairs.jsonl")
