"""Faults a hostile user can cause, each reproduced end to end: nothing of the user's is ever deleted, every
cache is verified, and no fault ends in a traceback.

This file is the one exception to tests mirroring the package: it gathers, per fault, the test that showed
it and now holds the fix, across stages (output directory and lock, both caches, damaged checkpoints,
recipe bombs, a full disk, Ctrl-C through a pipe, odd data). The mechanics behind each fix are tested in the
module's own file as well.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import dpo.train.checkpoint as ckpt
import dpo.train.metric_log as metric_log
from dpo.cli import main
from dpo.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from tests.helpers import (
    Crash,
    build_tiny_model,
    crash_at_micro_batch,
    write_jsonl,
    write_pairs,
    write_recipe,
)

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {"max_steps": 2, "batch_size": 4, "lr": 0.003, "warmup_steps": 0, "log_every": 1, "seed": 0,
         "save_every": 1, "keep_last": 10}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    train, eval_ = write_pairs(root / "data", train=16, eval=8)
    return {"model": build_tiny_model(root / "model"), "train": train, "eval": eval_}


def make_recipe(path: Path, assets: dict[str, Path], out: str | Path, **train) -> Path:
    tree = {
        "model": {"path": str(assets["model"])},
        "data": {"train": str(assets["train"]), "eval": str(assets["eval"]), "max_length": 48,
                 "max_prompt_length": 32},
        "lora": {"r": 4, "alpha": 8},
        "loss": {"name": "dpo", "beta": 0.5},
        "train": {**TRAIN, **train},
        "reference": {"batch_size": 8},
        "output": {"dir": str(out)},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_recipe(path, tree)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``dpo-train ARGS`` run in this process."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder``: file bytes, link targets, and folders."""
    found: dict[str, bytes | str] = {}
    for current, folders, names in os.walk(folder):
        for name in folders + names:
            path = Path(current) / name
            key = str(path.relative_to(folder))
            if path.is_symlink():
                found[key] = f"-> {os.readlink(path)}"
            elif path.is_dir():
                found[key] = "folder"
            else:
                found[key] = path.read_bytes()
    return found


def one_paragraph(err: str) -> str:
    """The one error paragraph (a single line) in ``err``, which holds no traceback."""
    assert "Traceback" not in err
    errors = [line for line in err.replace("\r", "\n").splitlines() if "error: " in line]
    assert len(errors) == 1, err
    tail = err.rstrip().splitlines()[-1]
    assert tail.endswith(errors[0]), err  # nothing after it: the paragraph is the whole message
    return errors[0][errors[0].index("error: "):]


def no_space(path) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", str(path))


# ------------------------------------------------------------------ 1. --overwrite deletes only its own files


def decoy(folder: Path) -> Path:
    """A folder dpo-train did not create, holding files under the names a run writes."""
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "mine.bin").write_bytes(os.urandom(64))
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "important.txt").write_text("my notes\n")
    (folder / "metrics.jsonl").write_text('{"mine": 1}\n')
    (folder / "notes.txt").write_text("untouched\n")
    return folder


@pytest.mark.parametrize("how", ["plain", "through a symlink", "output.dir: ..", "output.dir: . beside the recipe"])
def test_overwrite_in_a_folder_dpo_train_did_not_create_refuses_and_every_user_file_survives(
        tmp_path, assets, capsys, monkeypatch, how):
    project = decoy(tmp_path / "myproj")
    recipe = make_recipe(project / "recipe.yaml", assets, out=project)
    args = [str(recipe)]
    if how == "through a symlink":
        (tmp_path / "link").symlink_to(project)
        args += ["--set", f"output.dir={tmp_path / 'link'}"]
    elif how == "output.dir: ..":
        (project / "sub").mkdir()
        monkeypatch.chdir(project / "sub")
        args += ["--set", "output.dir=.."]
    elif how == "output.dir: . beside the recipe":
        monkeypatch.chdir(project)
        args = ["recipe.yaml", "--set", "output.dir=."]
    before = snapshot(project)
    code, _, err = run_cli([*args, "--overwrite"], capsys)
    assert code == 2
    message = one_paragraph(err)
    assert "not created by dpo-train" in message and "metrics.jsonl" in message and "adapter" in message
    assert snapshot(project) == before


def test_overwrite_deletes_exactly_what_the_previous_run_wrote(tmp_path, assets, capsys):
    out = tmp_path / "out"
    recipe = make_recipe(tmp_path / "recipe.yaml", assets, out=out)
    main([str(recipe)])
    (out / "adapter" / "mine.bin").write_bytes(b"user weights")
    (out / "checkpoints" / "important.txt").write_text("keep\n")
    (out / "notes.txt").write_text("untouched\n")
    user = {k: v for k, v in snapshot(out).items() if k.endswith(("mine.bin", "important.txt", "notes.txt"))}
    code, stdout, _ = run_cli([str(recipe), "--overwrite"], capsys)
    assert code == 0 and "kept" in stdout
    assert {k: v for k, v in snapshot(out).items() if k in user} == user  # every user file, byte for byte
    marker = json.loads((out / ".dpo-train").read_text())["written"]
    assert "adapter/mine.bin" not in marker["files"] and "adapter/adapter_model.safetensors" in marker["files"]
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [0, 1, 2, 2]


def as_written_before_markers_recorded_paths(out: Path) -> None:
    """Give ``out`` the marker an earlier dpo-train wrote: its name and version, no record of paths; and take
    away the files that version did not write yet (a README.md there would be the user's)."""
    (out / ".dpo-train").write_text(json.dumps({"created_by": "dpo-train", "version": "0.1.0"}) + "\n")
    for name in ("README.md", "train.log", "curves.png", "samples.jsonl"):
        (out / name).unlink(missing_ok=True)


def test_a_run_an_earlier_version_started_resumes_and_its_user_files_survive(tmp_path, assets, capsys):
    out = tmp_path / "out"
    recipe = make_recipe(tmp_path / "recipe.yaml", assets, out=out, max_steps=3, keep_last=2)
    main([str(recipe)])
    uninterrupted = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    # Stopped after step 2: the step-3 checkpoint and the final outputs were never written.
    for path in ("checkpoints/step-000003", "adapter", "final_metrics.json"):
        shutil.rmtree(out / path) if (out / path).is_dir() else (out / path).unlink()
    as_written_before_markers_recorded_paths(out)
    (out / "checkpoints" / "important.txt").write_text("keep\n")
    code, stdout, err = run_cli([str(recipe), "--resume"], capsys)
    assert code == 0, err
    assert "resumed from" in stdout and "step-000002" in stdout
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == uninterrupted
    assert (out / "checkpoints" / "important.txt").read_text() == "keep\n"
    # Rotation (keep_last 2) removed the adopted step-1 checkpoint, which its manifest proved dpo-train's.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["important.txt", "step-000002", "step-000003"]


def test_overwrite_of_a_run_an_earlier_version_wrote_deletes_only_what_it_provably_wrote(tmp_path, assets, capsys):
    out = tmp_path / "out"
    recipe = make_recipe(tmp_path / "recipe.yaml", assets, out=out)
    main([str(recipe)])
    as_written_before_markers_recorded_paths(out)
    (out / "adapter" / "mine.bin").write_bytes(b"user weights")
    (out / "checkpoints" / "step-000099").mkdir()  # no manifest: not provably dpo-train's
    (out / "checkpoints" / "step-000099" / "notes.txt").write_text("keep\n")
    code, stdout, err = run_cli([str(recipe), "--overwrite"], capsys)
    assert code == 0, err
    assert (out / "adapter" / "mine.bin").read_bytes() == b"user weights"
    assert (out / "checkpoints" / "step-000099" / "notes.txt").read_text() == "keep\n"
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [0, 1, 2, 2]


def test_a_recorded_file_replaced_by_a_symlink_is_never_followed(tmp_path, assets, capsys):
    out = tmp_path / "out"
    recipe = make_recipe(tmp_path / "recipe.yaml", assets, out=out, max_steps=1)
    main([str(recipe)])
    precious = tmp_path / "precious.json"
    precious.write_text("{}")
    (out / "final_metrics.json").unlink()
    (out / "final_metrics.json").symlink_to(precious)
    code, _, err = run_cli([str(recipe), "--overwrite"], capsys)
    assert code == 2 and "dpo-train did not write final_metrics.json there" in one_paragraph(err)
    assert precious.read_text() == "{}" and (out / "final_metrics.json").is_symlink()


def test_the_recipe_being_read_is_never_deleted_or_replaced(tmp_path, assets, capsys):
    out = tmp_path / "out"
    main([str(make_recipe(tmp_path / "recipe.yaml", assets, out=out, max_steps=1))])
    own_recipe = (out / "recipe.yaml").read_bytes()  # now read back as the input of a new run
    code, _, err = run_cli([str(out / "recipe.yaml"), "--overwrite", "--set", "train.log_every=2"], capsys)
    assert code == 2 and "the recipe" in one_paragraph(err) and "which a run writes" in err
    assert (out / "recipe.yaml").read_bytes() == own_recipe


# ------------------------------------------------------------------------------- 2. one run per folder


SLOW_DRIVER = """
import sys, time
import dpo.train.setup as train_setup

real = train_setup.batch_loss

def slow_batch_loss(policy, *args):
    if policy.training:
        time.sleep(float(sys.argv[2]))
    return real(policy, *args)

train_setup.batch_loss = slow_batch_loss
from dpo.cli import main
main([sys.argv[1], *sys.argv[3:]])
"""


def start_slow_run(tmp_path: Path, recipe: Path, seconds: float, *args: str, **popen) -> subprocess.Popen:
    driver = tmp_path / "slow_driver.py"
    driver.write_text(SLOW_DRIVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    popen = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True, **popen}
    return subprocess.Popen([sys.executable, str(driver), str(recipe), str(seconds), *args], cwd=ROOT, env=env,
                            **popen)


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {process.returncode}")
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"no {what} within {timeout} s")


def first_step_written(out: Path):
    metrics = out / "metrics.jsonl"
    return lambda: metrics.is_file() and '"split": "train"' in metrics.read_text()


@pytest.mark.slow
def test_a_second_run_in_a_held_folder_is_refused_naming_the_holder_and_a_killed_one_holds_nothing(
        tmp_path, assets, capsys):
    out = tmp_path / "out"
    recipe = make_recipe(tmp_path / "recipe.yaml", assets, out=out, max_steps=8)
    first = start_slow_run(tmp_path, recipe, 1.0)
    try:
        wait_for(lambda: latest_checkpoint(out) is not None, first, "a first checkpoint")
        for flags in ([], ["--overwrite"], ["--resume"]):
            code, _, err = run_cli([str(recipe), *flags], capsys)
            assert code == 2, flags
            assert f"in use by another dpo-train run (process {first.pid}" in one_paragraph(err)
    finally:
        first.kill()  # a crash: the kernel drops the lock with the process
        first.wait()
    code, stdout, _ = run_cli([str(recipe), "--resume"], capsys)
    assert code == 0 and "resumed from" in stdout


def test_writers_of_one_reference_cache_entry_wait_then_read_the_finished_entry(tmp_path, assets):
    from dpo.data import prepare_data
    from dpo.files import FileLock
    from dpo.model import load_tokenizer
    from dpo.recipe import load_recipe
    from dpo.reference import ReferenceStore, precompute_references, reference_keys

    cache = tmp_path / "ref-cache"
    recipe_path = make_recipe(tmp_path / "recipe.yaml", assets, out=tmp_path / "out")
    recipe = load_recipe(recipe_path, [f"reference.cache_dir={cache}"])
    data = prepare_data(recipe.data, load_tokenizer(recipe.model), unpaired=False, seed=0, log=lambda _: None)
    keys = reference_keys(recipe, data)
    store = ReferenceStore(cache)
    cache.mkdir()
    holder = FileLock(cache / f"{keys['train'][0]}.lock").acquire()  # another writer is computing this entry
    messages: list[str] = []
    worker = threading.Thread(target=precompute_references, args=(recipe, messages.append))
    worker.start()
    time.sleep(3.0)
    assert worker.is_alive() and not store.path(keys["train"][0]).exists()  # it waits, computing nothing
    assert any("being written by" in m for m in messages)
    count = len(data.train)
    finished = {"first": torch.full((count,), -1.5), "second": torch.full((count,), -2.5),
                "first_tokens": torch.ones(count, dtype=torch.long), "second_tokens": torch.ones(count, dtype=torch.long)}
    store.save(keys["train"][0], finished, keys["train"][1])  # the other writer finishes
    holder.release()
    worker.join(timeout=120)
    assert not worker.is_alive()
    assert any(f"hit ({store.path(keys['train'][0])})" in m for m in messages)  # read, not recomputed
    assert not any("computing" in m and "train split" in m for m in messages)


# ------------------------------------------------------------------- 3. the tokenized cache is verified


def flip_one_token(entry: Path, ids: list[int]) -> None:
    """Change the first stored occurrence of the int32 sequence ``ids`` in the entry's Arrow file by one."""
    arrow = next((entry / "dataset").glob("*.arrow"))
    data = bytearray(arrow.read_bytes())
    needle = b"".join(int(i).to_bytes(4, "little", signed=True) for i in ids)
    at = data.find(needle)
    assert at >= 0
    data[at + 4 * (len(ids) - 1)] += 1
    arrow.write_bytes(bytes(data))


def test_a_changed_int32_in_the_tokenized_cache_is_caught_and_retokenized(tmp_path, assets):
    from dpo.data import prepare_data
    from dpo.data.cache import content_hash
    from dpo.model import load_tokenizer
    from dpo.recipe import load_recipe

    recipe = load_recipe(make_recipe(tmp_path / "recipe.yaml", assets, out=tmp_path / "out"),
                         [f"data.cache_dir={tmp_path / 'cache'}"])
    tokenizer = load_tokenizer(recipe.model)

    def prepare():
        messages: list[str] = []
        return prepare_data(recipe.data, tokenizer, unpaired=False, seed=0, log=messages.append), messages

    first, _ = prepare()
    entry = next(p for p in (tmp_path / "cache").iterdir() if p.is_dir() and (p / "dataset").is_dir()
                 and len(first.train) == json.loads((p / "meta.json").read_text())["count"])
    flip_one_token(entry, first.train[0]["prompt_ids"][-6:])
    again, messages = prepare()
    assert any("does not match" in m and "tokenizing" in "\n".join(messages) for m in messages), messages
    assert not any("train: " in m and "reused from the cache" in m for m in messages)
    assert again.train[:] == first.train[:]  # the corrupted tokens were not used
    # The fingerprints (reference-cache key, checkpoint check) are those of the ids actually loaded.
    assert again.train_fingerprint == first.train_fingerprint == content_hash(again.train.with_format("arrow")[:])


def test_fingerprints_are_computed_from_the_loaded_ids_not_a_stored_field(tmp_path, assets):
    from dpo.data import prepare_data
    from dpo.data.cache import content_hash
    from dpo.model import load_tokenizer
    from dpo.recipe import load_recipe

    recipe = load_recipe(make_recipe(tmp_path / "recipe.yaml", assets, out=tmp_path / "out"),
                         [f"data.cache_dir={tmp_path / 'cache'}"])
    tokenizer = load_tokenizer(recipe.model)
    first = prepare_data(recipe.data, tokenizer, unpaired=False, seed=0, log=lambda _: None)
    for meta in (tmp_path / "cache").glob("*/meta.json"):
        stored = json.loads(meta.read_text())
        meta.write_text(json.dumps({**stored, "fingerprint": "0" * 32}))
    again = prepare_data(recipe.data, tokenizer, unpaired=False, seed=0, log=lambda _: None)
    assert again.train_fingerprint == first.train_fingerprint == content_hash(again.train.with_format("arrow")[:])
    assert again.eval_fingerprint == first.eval_fingerprint


# --------------------------------------------------------------- 4. one damaged checkpoint does not brick a run


@pytest.mark.parametrize("resume", ["latest", "step-000003"])
def test_a_truncated_manifest_in_an_older_checkpoint_is_skipped_and_saving_goes_on(tmp_path, assets, monkeypatch,
                                                                                   capsys, resume):
    out = tmp_path / "out"
    recipe = make_recipe(tmp_path / "recipe.yaml", assets, out=out, max_steps=4)
    crash_at_micro_batch(monkeypatch, 4)
    with pytest.raises(Crash):
        main([str(recipe)])
    monkeypatch.undo()
    manifest = out / "checkpoints" / "step-000002" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:40])
    capsys.readouterr()
    args = ["--resume"] if resume == "latest" else ["--resume", str(out / "checkpoints" / resume)]
    code, stdout, err = run_cli([str(recipe), *args], capsys)
    assert code == 0, err
    assert f"resumed from {out / 'checkpoints' / 'step-000003'}" in stdout
    if resume == "latest":
        assert f"skipped a damaged checkpoint: {out / 'checkpoints' / 'step-000002'}" in stdout
    assert [step for _, step, _ in list_checkpoints(out)] == [1, 3, 4]
    assert load_checkpoint(latest_checkpoint(out)).step == 4


KILL_DRIVER = """
import os, sys
import dpo.train.checkpoint as ckpt

mode = sys.argv[2]
real_sync_file, real_sync_dir = ckpt._sync_file, ckpt._sync_dir

def sync_file(path):
    if mode == "mid-save" and path.parent.name == ".tmp-step-000002" and path.name == "optimizer.json":
        os._exit(137)  # killed while writing the step-2 checkpoint
    real_sync_file(path)

def sync_dir(path):
    if mode == "mid-rotation" and path.name == "step-000001" and not (path / "manifest.json").exists():
        os._exit(137)  # killed while deleting the step-1 checkpoint: its manifest is gone, its files not
    real_sync_dir(path)

ckpt._sync_file, ckpt._sync_dir = sync_file, sync_dir
from dpo.cli import main
main([sys.argv[1]])
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode, left", [("mid-save", "checkpoints/.tmp-step-000002"),
                                        ("mid-rotation", "checkpoints/step-000001")])
def test_what_a_killed_run_left_under_checkpoints_is_cleaned_at_start(tmp_path, assets, capsys, mode, left):
    out = tmp_path / "out"
    recipe = make_recipe(tmp_path / "recipe.yaml", assets, out=out, max_steps=3, keep_last=1)
    driver = tmp_path / "kill_driver.py"
    driver.write_text(KILL_DRIVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, str(driver), str(recipe), mode], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 137, killed.stderr
    assert (out / left).is_dir()
    code, stdout, err = run_cli([str(recipe), "--resume"], capsys)
    assert code == 0, err
    assert f"removed {'the incomplete ' if mode == 'mid-rotation' else ''}{out / left}" in stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003"]


# ------------------------------------------------------------------------ 5. a recipe cannot hang the program


def run_in_subprocess(args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dpo.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_an_alias_bomb_in_a_typed_field_is_refused_at_once(tmp_path):
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for previous, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{', '.join(f'*{previous}' for _ in range(9))}]")
    lines += ["model: {path: m}", "data: {train: *i}", "output: {dir: o}"]
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text("\n".join(lines) + "\n")
    result = run_in_subprocess([str(recipe), "--dry-run"])  # 9^9 values once expanded; refused long before
    assert result.returncode == 2
    message = one_paragraph(result.stderr)
    assert "aliases" in message and len(message) < 400


def test_a_recipe_over_1_mb_is_refused_before_it_is_parsed(tmp_path, assets):
    recipe = make_recipe(tmp_path / "recipe.yaml", assets, out=tmp_path / "out")
    with open(recipe, "a", encoding="utf-8") as handle:
        handle.write("# padding\n" * 110_000)
    from dpo.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=r"over 1 MB"):
        load_recipe(recipe)


def test_an_error_message_shows_only_an_excerpt_of_the_offending_value(tmp_path):
    from dpo.recipe import RecipeError, load_recipe

    recipe = write_recipe(tmp_path / "recipe.yaml", {"model": {"path": "m"}, "output": {"dir": "o"},
                                                     "data": {"train": list(range(5000))}})
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    line = next(line for line in str(info.value).splitlines() if "data.train" in line)
    assert len(line) < 200 and "..." in line


# ----------------------------------------------------------------------------- 6. a full disk, not a traceback


def assert_disk_full_message(err: str, path_part: str, checkpoint: Path | None) -> str:
    message = one_paragraph(err)
    assert "No space left on device" in message and path_part in message
    if checkpoint is not None:
        assert f"The last checkpoint, {checkpoint}, is intact" in message
    return message


def test_disk_full_while_saving_a_checkpoint_keeps_the_last_one_and_removes_the_unfinished(tmp_path, assets,
                                                                                            monkeypatch, capsys):
    out = tmp_path / "out"
    recipe = make_recipe(tmp_path / "recipe.yaml", assets, out=out, max_steps=3)
    real = ckpt._write_new_file

    def write_new_file(path, data):
        if "step-000002" in str(path) and path.name == "optimizer.json":
            raise no_space(path)
        real(path, data)

    monkeypatch.setattr(ckpt, "_write_new_file", write_new_file)
    code, _, err = run_cli([str(recipe)], capsys)
    assert code == 2
    message = assert_disk_full_message(err, "step-000002", out / "checkpoints" / "step-000001")
    assert "it needs about" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]  # no temporary folder
    monkeypatch.undo()
    code, stdout, err = run_cli([str(recipe), "--resume"], capsys)
    assert code == 0 and f"resumed from {out / 'checkpoints' / 'step-000001'}" in stdout


def test_disk_full_while_appending_metrics(tmp_path, assets, monkeypatch, capsys):
    out = tmp_path / "out"
    recipe = make_recipe(tmp_path / "recipe.yaml", assets, out=out)
    calls = []

    def failing_open(path, mode="r", *args, **kwargs):
        if "a" in mode and str(path).endswith("metrics.jsonl"):
            calls.append(path)
            if len(calls) == 3:  # the record of step 2, after the step-1 checkpoint
                raise no_space(path)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(metric_log, "open", failing_open, raising=False)
    code, _, err = run_cli([str(recipe)], capsys)
    assert code == 2
    assert_disk_full_message(err, "metrics.jsonl", out / "checkpoints" / "step-000001")


def test_disk_full_while_saving_the_adapter(tmp_path, assets, monkeypatch, capsys):
    from peft import PeftModel

    out = tmp_path / "out"
    recipe = make_recipe(tmp_path / "recipe.yaml", assets, out=out)
    real = PeftModel.save_pretrained

    def save_pretrained(self, directory, *args, **kwargs):
        if "checkpoints" not in str(directory):
            raise no_space(Path(directory) / "adapter_model.safetensors")
        return real(self, directory, *args, **kwargs)

    monkeypatch.setattr(PeftModel, "save_pretrained", save_pretrained)
    code, _, err = run_cli([str(recipe)], capsys)
    assert code == 2
    assert_disk_full_message(err, "adapter_model.safetensors", out / "checkpoints" / "step-000002")
    assert not (out / ".tmp-adapter").exists() and not (out / "adapter").exists()


def test_a_precompute_whose_final_write_fails_keeps_every_computed_value(tmp_path, assets, monkeypatch, capsys):
    from dpo.reference import ReferenceStore

    cache = tmp_path / "ref-cache"
    recipe = make_recipe(tmp_path / "recipe.yaml", assets, out=tmp_path / "out")
    args = ["cache", str(recipe), "--set", f"reference.cache_dir={cache}"]

    def save(self, fingerprint, tensors, parts, extra=None):
        raise no_space(self.path(fingerprint))

    monkeypatch.setattr(ReferenceStore, "save", save)
    code, _, err = run_cli(args, capsys)
    assert code == 2
    message = assert_disk_full_message(err, str(cache), None)
    partial = sorted(cache.glob("*.partial.safetensors"))
    assert len(partial) == 1 and str(partial[0]) in message
    monkeypatch.undo()
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0
    assert "computing 0 sequences" in stdout and "resuming after 32 saved" in stdout  # nothing recomputed


def test_disk_full_while_caching_tokenized_data_leaves_no_temporary_folder(tmp_path, assets, monkeypatch, capsys):
    import datasets

    cache = tmp_path / "tok-cache"
    recipe = make_recipe(tmp_path / "recipe.yaml", assets, out=tmp_path / "out")

    def save_to_disk(self, path, *args, **kwargs):
        raise no_space(Path(path) / "data-00000-of-00001.arrow")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", save_to_disk)
    code, _, err = run_cli([str(recipe), "--set", f"data.cache_dir={cache}"], capsys)
    assert code == 2
    assert_disk_full_message(err, str(cache), None)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


# ------------------------------------------------------------------- 7. Ctrl-C through a pipe still checkpoints


@pytest.mark.slow
def test_a_stop_signal_checkpoints_even_when_the_pipe_reader_is_gone(tmp_path, assets):
    """Ctrl-C through ``| tee``: SIGINT, with the pipe closed (SIGTERM takes the same path in the handler)."""
    signum = signal.SIGINT
    out = tmp_path / "out"
    recipe = make_recipe(tmp_path / "recipe.yaml", assets, out=out, max_steps=50, save_every=None)
    run = start_slow_run(tmp_path, recipe, 0.5, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for(first_step_written(out), run, "a first step")
    run.stdout.close()  # `| tee log` stopped by the same Ctrl-C: nobody reads our output any more
    run.send_signal(signum)
    assert run.wait(timeout=120) == 128 + signum
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and load_checkpoint(checkpoint).step >= 1


def test_resume_restarts_from_step_0_a_run_that_stopped_before_its_first_checkpoint(tmp_path, assets, monkeypatch,
                                                                                   capsys):
    out = tmp_path / "out"
    recipe = make_recipe(tmp_path / "recipe.yaml", assets, out=out)
    crash_at_micro_batch(monkeypatch, 1)
    with pytest.raises(Crash):
        main([str(recipe)])
    monkeypatch.undo()
    assert (out / "metrics.jsonl").is_file() and latest_checkpoint(out) is None
    code, stdout, err = run_cli([str(recipe), "--resume"], capsys)
    assert code == 0, err
    assert "holds no checkpoint" in stdout and "starting from step 0" in stdout
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [0, 1, 2, 2]


# ------------------------------------------------------------------------------------------ 8. smaller ones


def test_a_tilde_is_expanded_in_every_path_key(tmp_path, monkeypatch):
    from dpo.recipe import recipe_from_dict

    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = recipe_from_dict({
        "model": {"path": "~/model"},
        "data": {"train": "~/train.jsonl", "eval": "~/eval.jsonl", "cache_dir": "~/tok", "chat_template": "~/t.jinja"},
        "reference": {"model_path": "~/ref", "adapter": "~/adapter", "cache_dir": "~/ref-cache"},
        "output": {"dir": "~"},
    })
    resolved = recipe.to_yaml()
    assert "~" not in resolved and recipe.output.dir == str(tmp_path)
    assert recipe.data.train == str(tmp_path / "train.jsonl") and recipe.reference.adapter == str(tmp_path / "adapter")


def test_dry_run_checks_the_output_directory_as_the_run_does(tmp_path, assets, capsys):
    (tmp_path / "a-file").write_text("")
    recipe = make_recipe(tmp_path / "recipe.yaml", assets, out=tmp_path / "a-file")
    code, _, err = run_cli([str(recipe), "--dry-run"], capsys)
    assert code == 2 and "is a file" in one_paragraph(err)
    decoy(tmp_path / "foreign")
    code, _, err = run_cli([str(recipe), "--dry-run", "--set", f"output.dir={tmp_path / 'foreign'}"], capsys)
    assert code == 2 and "not created by dpo-train" in err


@pytest.mark.parametrize("content, expected", [
    ("", r"data.train: .*empty.jsonl is empty"),
    ("\n  \n", r"data.train: .*empty.jsonl is empty"),
    ('[\n  {"prompt": "a", "chosen": "b", "rejected": "c"}\n]\n',
     r"empty.jsonl is not JSON Lines .*line 1 opens a JSON array"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"},\n{"prompt": "d", "chosen": "e", "rejected": "f"},\n',
     r"empty.jsonl is not JSON Lines .*no line holds a row; line 1: not valid JSON"),
])
def test_an_empty_file_or_a_json_array_in_jsonl_says_so(tmp_path, content, expected):
    from dpo.data import DataError
    from dpo.data.prepare import read_canonical
    from tests.data_helpers import data_config

    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=expected):
        read_canonical(data_config(path, tmp_path / "cache"), str(path), "data.train", print)


def test_csv_cells_are_read_as_strings(tmp_path):
    from dpo.data.load import load_rows

    path = tmp_path / "pairs.csv"
    path.write_text('prompt,chosen,rejected,label\n"2 - 2 =", 0, 1,true\nfoo,007,1.50,false\n', encoding="utf-8")
    rows = [row for _, row in load_rows(str(path), split="train", key="data.train").rows]
    assert rows == [{"prompt": "2 - 2 =", "chosen": " 0", "rejected": " 1", "label": "true"},
                    {"prompt": "foo", "chosen": "007", "rejected": "1.50", "label": "false"}]


def test_a_csv_of_numeric_looking_completions_trains(tmp_path, assets, capsys):
    rows = [{"prompt": f"{n} - {n} =", "chosen": " 0", "rejected": f" {n % 7 + 1}"} for n in range(20)]
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\n" + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n"
                                                          for r in rows), encoding="utf-8")
    recipe = make_recipe(tmp_path / "recipe.yaml", {**assets, "train": path}, out=tmp_path / "out")
    code, stdout, err = run_cli([str(recipe), "--dry-run", "--set", "data.eval=null"], capsys)
    assert code == 0, err
    assert "pairs:              20 (train 18, eval 2)" in stdout


class SpyTokenizer:
    """A tokenizer that records the length of every text it is asked to tokenize."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.lengths: list[int] = []

    def __call__(self, texts, **kwargs):
        self.lengths += [len(texts)] if isinstance(texts, str) else [len(t) for t in texts]
        return self.inner(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_huge_single_line_is_cut_before_it_is_tokenized():
    from dpo.data.tokenize import RowTokenizer
    from tests.helpers import build_tokenizer

    tokenizer = build_tokenizer()
    spy = SpyTokenizer(tokenizer)
    row_tokenizer = RowTokenizer(spy, sides=("chosen", "rejected"), chat_template=None, template_label="",
                                 max_length=64, max_prompt_length=32, truncation="keep_end", source="d.jsonl",
                                 unit="line")
    huge = "x" * 2_000_000 + " end"
    out = row_tokenizer({"number": [1], "prompt": [huge], "chosen": [" yes"], "rejected": [huge]})
    assert max(spy.lengths) <= 64 * 64  # a bounded multiple of the token budget, not 2 MB
    assert out["truncated"] == [True]
    assert len(out["prompt_ids"][0]) == 32 and out["prompt_ids"][0][-4:] == tokenizer(" end", add_special_tokens=False)[
        "input_ids"]
    assert len(out["rejected_ids"][0]) == 64 - 32


@pytest.mark.parametrize("chosen, rejected", [(" Paris.", " Paris."), (" Paris.", "Paris.  "),
                                              (" Paris,\n  of course.", " Paris, of course.")])
def test_a_pair_whose_sides_differ_only_in_whitespace_is_a_bad_row(chosen, rejected):
    from dpo.data.layouts import normalise_row
    from dpo.data.validate import IDENTICAL, RowProblem

    with pytest.raises(RowProblem) as info:
        normalise_row({"prompt": "Capital of France?", "chosen": chosen, "rejected": rejected}, "explicit", chat=False)
    assert info.value.reason == IDENTICAL


def test_exact_duplicate_pairs_are_counted_in_the_data_summary(tmp_path, assets, capsys):
    rows = [json.loads(line) for line in assets["train"].read_text().splitlines()]
    data = write_jsonl(tmp_path / "train.jsonl", rows + rows[:3] + rows[:1])
    recipe = make_recipe(tmp_path / "recipe.yaml", {**assets, "train": data}, out=tmp_path / "out")
    code, stdout, err = run_cli([str(recipe), "--dry-run"], capsys)
    assert code == 0, err
    assert "duplicate pairs:    4" in stdout
