"""Checkpoint mechanics on a tiny peft model: atomic writes, verification, rotation, restore, output-dir rules."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import signal
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

import dpo.train.checkpoint as ckpt
from dpo.train.checkpoint import (
    CheckpointError,
    LoopState,
    StopSignals,
    capture_rng,
    check_output_dir,
    check_resume,
    clean_incomplete_checkpoints,
    find_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prepare_output_dir,
    read_checkpoint_state,
    recipe_differences,
    restore_checkpoint,
    restore_rng,
    resume_state,
    rewind_metrics,
    run_differences,
    run_record,
    save_checkpoint,
    scan_checkpoints,
    tensor_fingerprint,
)
from dpo.train.output_dir import RunDirectory


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.proj(x)


def make_parts(seed: int, steps: int = 2, eight_bit: bool = False):
    """A LoRA-wrapped linear layer, AdamW (torch's, or bitsandbytes' 8-bit one) and a warmup-cosine schedule
    after ``steps`` updates."""
    from transformers import get_scheduler

    torch.manual_seed(seed)
    model = get_peft_model(TinyNet(), LoraConfig(r=2, lora_alpha=4, target_modules=["proj"]))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if eight_bit:
        import bitsandbytes as bnb

        # min_8bit_size=1: quantize even these tiny tensors, so the state holds bitsandbytes' nested dict.
        optimizer = bnb.optim.AdamW8bit([p for _, p in named], lr=0.01, min_8bit_size=1)
    else:
        optimizer = torch.optim.AdamW([p for _, p in named], lr=0.01)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=10)
    for _ in range(steps):
        train_step(model, optimizer, scheduler)
    return model, optimizer, scheduler, [n for n, _ in named]


def fresh_parts():
    """The same base weights with a different adapter and an empty optimizer: what a resumed run starts from."""
    parts = make_parts(seed=0, steps=0)
    with torch.no_grad():
        for p in parts[0].parameters():
            if p.requires_grad:
                p.add_(1.0)
    return parts


def train_step(model, optimizer, scheduler) -> None:
    x = torch.randn(5, 4)
    model(x).square().mean().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


RUN = run_record({"loss": {"name": "dpo", "beta": 0.1}}, {"data.train": "abc"}, 1)


def save(out: Path, parts, step: int, keep_last: int = 10, log=lambda _: None) -> Path:
    model, optimizer, scheduler, names = parts
    loop = LoopState(step=step, epoch=1, micro_batch=3, bad_steps=1, grad_norm=0.25, window_sums={"loss": 1.5},
                     window_counts={"loss": 2}, eval_before={"loss": 0.69})
    return save_checkpoint(RunDirectory.create(out), loop, model=model, optimizer=optimizer, scheduler=scheduler,
                           scaler=None, param_names=names, rng_states=[capture_rng()], run=RUN, keep_last=keep_last,
                           log=log)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------ write and restore


def test_restore_reproduces_parameters_optimizer_schedule_rng_and_the_next_step(tmp_path):
    parts = make_parts(seed=0)
    path = save(tmp_path, parts, step=2)
    # What the original does next: draws from every generator, then one more training step.
    expected_draws = (random.random(), float(np.random.rand()), torch.rand(3))
    train_step(*parts[:3])

    fresh = fresh_parts()
    loop = restore_checkpoint(load_checkpoint(path), model=fresh[0], optimizer=fresh[1], scheduler=fresh[2],
                              scaler=None, param_names=fresh[3], process_index=0)
    assert loop == LoopState(step=2, epoch=1, micro_batch=3, bad_steps=1, grad_norm=0.25, window_sums={"loss": 1.5},
                             window_counts={"loss": 2}, eval_before={"loss": 0.69})
    draws = (random.random(), float(np.random.rand()), torch.rand(3))
    assert draws[:2] == expected_draws[:2] and torch.equal(draws[2], expected_draws[2])
    train_step(*fresh[:3])  # same batch (same RNG), same optimizer moments and learning rate
    assert_bitwise_equal(trainable(fresh[0]), trainable(parts[0]))
    assert fresh[2].get_last_lr() == parts[2].get_last_lr()


def test_an_8bit_optimizer_state_round_trips_bitwise(tmp_path):
    parts = make_parts(seed=0, eight_bit=True)
    nested = [v for entry in parts[1].state_dict()["state"].values() for v in entry.values() if isinstance(v, dict)]
    assert nested, "bitsandbytes no longer nests its 8-bit state; this test no longer covers that layout"
    path = save(tmp_path, parts, step=2)
    train_step(*parts[:3])

    fresh = make_parts(seed=0, steps=0, eight_bit=True)  # same frozen base; a fresh adapter and optimizer
    with torch.no_grad():
        for p in fresh[0].parameters():
            if p.requires_grad:
                p.add_(1.0)
    restore_checkpoint(load_checkpoint(path), model=fresh[0], optimizer=fresh[1], scheduler=fresh[2],
                       scaler=None, param_names=fresh[3], process_index=0)
    train_step(*fresh[:3])
    assert_bitwise_equal(trainable(fresh[0]), trainable(parts[0]))


def test_manifest_lists_every_file_with_its_size_and_sha256(tmp_path):
    path = save(tmp_path, make_parts(seed=0), step=4)
    manifest = json.loads((path / "manifest.json").read_text())
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert {"adapter/adapter_model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
            "rng.json", "state.json", "run.json"} <= on_disk
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest["step"] == 4 and path.name == "step-000004"
    assert json.loads((path / "run.json").read_text())["recipe"] == RUN["recipe"]


def test_optimizer_state_is_tensors_in_safetensors_and_the_rest_in_json(tmp_path):
    parts = make_parts(seed=0, steps=3)
    path = save(tmp_path, parts, step=3)
    tensors = load_file(path / "optimizer.safetensors")
    assert set(tensors) == {f"{i}.{k}" for i in (0, 1) for k in ("step", "exp_avg", "exp_avg_sq")}
    assert float(tensors["0.step"]) == 3.0
    meta = json.loads((path / "optimizer.json").read_text())
    assert meta["param_names"] == parts[3]
    assert meta["param_groups"][0]["lr"] == parts[1].param_groups[0]["lr"]


def count_syncs(monkeypatch, action) -> int:
    calls = []
    real = ckpt._sync_file
    monkeypatch.setattr(ckpt, "_sync_file", lambda path: (calls.append(path), real(path)))
    action()
    monkeypatch.setattr(ckpt, "_sync_file", real)
    return len(calls)


def test_a_kill_at_any_file_write_leaves_the_previous_checkpoint_as_the_latest(tmp_path, monkeypatch):
    parts = make_parts(seed=0)
    first = save(tmp_path, parts, step=1)
    writes = count_syncs(monkeypatch, lambda: save(tmp_path / "count", parts, step=2))
    assert writes >= 8  # adapter files, optimizer (2), scheduler, rng, state, run, manifest
    real = ckpt._sync_file
    for kill_at in range(writes):
        calls = []

        def dying_sync(path, kill_at=kill_at, calls=calls):
            if len(calls) == kill_at:
                raise KeyboardInterrupt(f"killed while writing {path.name}")
            calls.append(path)
            real(path)

        monkeypatch.setattr(ckpt, "_sync_file", dying_sync)
        with pytest.raises(KeyboardInterrupt):
            save(tmp_path, parts, step=2)
        monkeypatch.setattr(ckpt, "_sync_file", real)
        assert latest_checkpoint(tmp_path) == first, f"killed at write {kill_at}"
        assert load_checkpoint(first).step == 1
    # What the kills left behind does not stand in the way of the next save.
    second = save(tmp_path, parts, step=2)
    assert latest_checkpoint(tmp_path) == second and load_checkpoint(second).step == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


@pytest.mark.parametrize("name", ["optimizer.safetensors", "adapter/adapter_model.safetensors", "state.json",
                                  "rng.json"])
@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_file_is_an_error_naming_it(tmp_path, name, damage):
    path = save(tmp_path, make_parts(seed=0), step=2)
    target = path / name
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(data[:10] + bytes([data[10] ^ 0x01]) + data[11:])
    else:
        target.unlink()
    with pytest.raises(CheckpointError, match=str(target)):
        load_checkpoint(path)


def test_a_checkpoint_without_manifest_does_not_exist(tmp_path):
    parts = make_parts(seed=0)
    first = save(tmp_path, parts, step=1)
    second = save(tmp_path, parts, step=2)
    (second / "manifest.json").unlink()
    assert latest_checkpoint(tmp_path) == first
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_checkpoint(second)


class Planted:
    """Unpickling this writes a marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "unpickled")


def plant(checkpoint: Path, name: str, data: bytes) -> None:
    """Put ``data`` in the checkpoint as ``name`` and list it in the manifest, as an attacker with write access could."""
    (checkpoint / name).write_bytes(data)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def restore_into_fresh(path: Path):
    fresh = fresh_parts()
    return restore_checkpoint(load_checkpoint(path), model=fresh[0], optimizer=fresh[1], scheduler=fresh[2],
                              scaler=None, param_names=fresh[3], process_index=0)


def test_a_planted_pickle_is_never_unpickled(tmp_path, monkeypatch):
    payload = pickle.dumps(Planted(tmp_path / "control"))
    pickle.loads(payload)  # the control: unpickling this payload does write its marker
    assert (tmp_path / "control").read_text() == "unpickled"

    marker = tmp_path / "marker"
    payload = pickle.dumps(Planted(marker))
    path = save(tmp_path / "run", make_parts(seed=0), step=2)
    # Files a torch.save-based trainer would read back: present, listed, and ignored.
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "adapter/adapter_model.bin"):
        plant(path, name, payload)

    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, forbidden)
    assert restore_into_fresh(path).step == 2
    # A pickle in place of a file that is read: refused as not safetensors, not executed.
    plant(path, "optimizer.safetensors", payload)
    with pytest.raises(CheckpointError, match="optimizer.safetensors: not a readable safetensors file"):
        restore_into_fresh(path)
    assert not marker.exists()


def test_a_checkpoint_for_other_parameters_is_refused_naming_the_file(tmp_path):
    path = save(tmp_path, make_parts(seed=0), step=2)
    torch.manual_seed(0)
    other = get_peft_model(TinyNet(), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    names = [n for n, p in other.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    with pytest.raises(CheckpointError, match="adapter_model.safetensors: .*shape"):
        restore_checkpoint(load_checkpoint(path), model=other, optimizer=optimizer, scheduler=scheduler,
                           scaler=None, param_names=names, process_index=0)


# ------------------------------------------------------------------------------------ rotation


def test_rotation_keeps_the_newest_and_touches_nothing_else(tmp_path):
    parts = make_parts(seed=0)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    out = tmp_path / "run"
    first = save(out, parts, step=1, keep_last=2)
    (first / "link").symlink_to(outside)  # not written by dpo-train: kept, and never followed
    root = out / "checkpoints"
    (root / "notes").mkdir()
    (root / "notes" / "a.txt").write_text("mine")
    (root / "step-000009").mkdir()  # no manifest: not a checkpoint, not ours to delete
    messages = []
    for step in (2, 3, 4):
        save(out, parts, step=step, keep_last=2, log=messages.append)
    assert [step for _, step, _ in list_checkpoints(out)] == [3, 4]
    assert sorted(p.name for p in root.iterdir()) == ["notes", "step-000001", "step-000003", "step-000004",
                                                      "step-000009"]
    assert [p.name for p in first.iterdir()] == ["link"]  # every file the run wrote went, the link stayed
    assert "kept checkpoints/step-000001/link (not written by dpo-train)" in "\n".join(messages)
    assert (outside / "precious.txt").read_text() == "keep me"


def test_a_resume_from_an_older_checkpoint_supersedes_the_later_ones(tmp_path):
    parts = make_parts(seed=0)
    for step in (1, 2, 3):
        save(tmp_path, parts, step=step)
    train_step(*parts[:3])  # the resumed run goes another way from step 1
    again = save(tmp_path, parts, step=2)
    assert latest_checkpoint(tmp_path) == again
    assert [step for _, step, _ in list_checkpoints(tmp_path)] == [1, 3, 2]  # in the order written
    saved = load_file(again / "adapter" / "adapter_model.safetensors")
    current = {k.replace(".default", ""): v for k, v in trainable(parts[0]).items()}
    assert_bitwise_equal(saved, current)


# ------------------------------------------------------------------------------------ RNG


def test_rng_states_survive_json_and_replay_every_generator():
    state = json.loads(json.dumps(capture_rng()))
    first = (random.random(), np.random.standard_normal(3).tolist(), torch.randn(4))
    restore_rng(state)
    second = (random.random(), np.random.standard_normal(3).tolist(), torch.randn(4))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


def test_each_process_gets_its_own_generators_back_and_one_the_checkpoint_lacks_needs_force(tmp_path):
    """A multi-process checkpoint holds one generator state per process (each draws its own dropout masks)."""
    parts = make_parts(seed=0)
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(capture_rng())
    path = save_checkpoint(RunDirectory.create(tmp_path), LoopState(step=2), model=parts[0], optimizer=parts[1],
                           scheduler=parts[2], scaler=None, param_names=parts[3], rng_states=states, run=RUN,
                           keep_last=2, log=lambda _: None)
    checkpoint = load_checkpoint(path)
    state = read_checkpoint_state(checkpoint, parts[0], parts[3])
    for index, seed in enumerate((1, 2)):
        resume_state(state, checkpoint, scheduler=parts[2], scaler=None, process_index=index)
        torch.manual_seed(seed)
        expected = torch.rand(3)
        resume_state(state, checkpoint, scheduler=parts[2], scaler=None, process_index=index)
        assert torch.equal(torch.rand(3), expected)
    with pytest.raises(CheckpointError, match="no generator state for process 2"):
        resume_state(state, checkpoint, scheduler=parts[2], scaler=None, process_index=2)
    messages: list[str] = []
    resume_state(state, checkpoint, scheduler=parts[2], scaler=None, process_index=2, force=True, log=messages.append)
    assert messages and messages[0].startswith("warning: --force") and "process 2" in messages[0]


def test_tensor_fingerprint_is_bitwise():
    base = torch.tensor([0.0, 1.5])
    assert tensor_fingerprint(base) == tensor_fingerprint(base.clone())
    assert tensor_fingerprint(base) != tensor_fingerprint(torch.tensor([-0.0, 1.5]))  # equal values, other bits
    assert tensor_fingerprint(base) != tensor_fingerprint(base.double())
    assert tensor_fingerprint(base) != tensor_fingerprint(base.reshape(2, 1))


# ---------------------------------------------------------------------------- resume agreement


def recipe(**changes) -> dict:
    tree = {"model": {"path": "/models/a", "dtype": "float32"},
            "data": {"train": "/data/train.jsonl", "eval": None, "max_length": 512, "num_proc": 1},
            "loss": {"name": "dpo", "beta": 0.1},
            "train": {"batch_size": 4, "grad_accum": 2, "save_every": 100, "log_every": 10},
            "output": {"dir": "/runs/a"}}
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        tree[section][key] = value
    return tree


def test_recipe_differences_list_what_changes_the_result_and_nothing_else():
    saved = {"recipe": recipe(), "fingerprints": {}}
    assert recipe_differences(saved, recipe(train__save_every=7, train__log_every=1, output__dir="/x",
                                            data__num_proc=4)) == []
    lines = recipe_differences(saved, recipe(loss__beta=0.3, train__batch_size=8, data__max_length=256))
    assert lines == ["data.max_length: 512 in the checkpoint, 256 now",
                     "loss.beta: 0.1 in the checkpoint, 0.3 now",
                     "train.batch_size: 4 in the checkpoint, 8 now"]
    # Without a fingerprint the path is all there is to compare; with one, a moved file is fine.
    assert recipe_differences(saved, recipe(data__train="/moved/train.jsonl")) == [
        "data.train: '/data/train.jsonl' in the checkpoint, '/moved/train.jsonl' now"]
    fingerprinted = {"recipe": recipe(), "fingerprints": {"data.train": "f1", "reference.train": "r1"}}
    assert recipe_differences(fingerprinted, recipe(data__train="/moved/train.jsonl", model__path="/m2")) == []


def test_run_differences_compare_fingerprints_and_process_count():
    saved = run_record({}, {"data.train": "a" * 64, "reference.train": "b" * 64}, 1)
    assert run_differences(saved, run_record({}, dict(saved["fingerprints"]), 1)) == []
    lines = run_differences(saved, run_record({}, {"data.train": "c" * 64, "reference.train": "b" * 64}, 2))
    assert lines == ["data.train: tokenized data differ, fingerprint aaaaaaaaaaaa in the checkpoint, "
                     "cccccccccccc now", "number of processes: 1 in the checkpoint, 2 now"]


def test_check_resume_refuses_listing_differences_or_warns_under_force(tmp_path):
    path = save(tmp_path, make_parts(seed=0), step=1)
    checkpoint = load_checkpoint(path)
    check_resume([], checkpoint, force=False, log=print)
    with pytest.raises(CheckpointError, match=r"(?s)cannot resume from .*step-000001.*loss.beta: 0.1.*--force"):
        check_resume(["loss.beta: 0.1 in the checkpoint, 0.2 now"], checkpoint, force=False, log=print)
    messages = []
    check_resume(["loss.beta: 0.1 in the checkpoint, 0.2 now"], checkpoint, force=True, log=messages.append)
    assert len(messages) == 1 and messages[0].startswith("warning: --force") and "loss.beta" in messages[0]


# ---------------------------------------------------------------------------- output directory


def prepare(out: Path, resume=None, overwrite=False, log=print) -> RunDirectory:
    """prepare_output_dir, its lock released at once (as at the end of a run)."""
    directory = prepare_output_dir(out, resume=resume, overwrite=overwrite, log=log)
    directory.close()
    return directory


def test_a_new_or_empty_output_dir_is_taken_and_marked(tmp_path):
    for out in (tmp_path / "new" / "run", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        prepare(out)
        assert json.loads((out / ".dpo-train").read_text())["created_by"] == "dpo-train"
    # Only the marker and the lock inside: still empty as far as a new run is concerned.
    prepare(tmp_path / "empty")


def test_a_foreign_non_empty_dir_is_refused_and_overwrite_writes_beside_its_files_deleting_nothing(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("user file")
    with pytest.raises(CheckpointError, match=rf"{out} is not empty and was not created by dpo-train.*--overwrite"):
        prepare(out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # refused before anything was created
    prepare(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [".dpo-train", ".dpo-train.lock", "notes.txt"]
    assert (out / "notes.txt").read_text() == "user file"


def test_overwrite_refuses_a_foreign_dir_whose_output_names_are_taken(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "weights.bin").write_text("keep")
    (out / "adapter").symlink_to(outside)
    with pytest.raises(CheckpointError, match=r"not created by dpo-train, and it holds metrics.jsonl, adapter, "
                                              r"names a run writes"):
        prepare(out, overwrite=True)
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n' and (out / "adapter").is_symlink()
    assert (outside / "weights.bin").read_text() == "keep"


def test_a_previous_run_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    directory = prepare(out)
    directory.write_text("metrics.jsonl", "", "metrics")
    with pytest.raises(CheckpointError, match="holds a previous dpo-train run: continue it with --resume"):
        prepare(out)
    prepare(out, resume=True)
    with pytest.raises(CheckpointError, match="pass one"):
        prepare(out, resume=True, overwrite=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="is a file"):
        prepare(tmp_path / "file")


def test_overwrite_refuses_when_a_user_file_sits_inside_an_old_checkpoint(tmp_path):
    out = tmp_path / "run"
    save(out, make_parts(seed=0), step=1)
    (out / "checkpoints" / "step-000001" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"checkpoints/step-000001/notes.txt inside the previous run's "
                                              r"checkpoints were not written by dpo-train"):
        prepare(out, overwrite=True)
    assert (out / "checkpoints" / "step-000001" / "manifest.json").is_file()  # refused before deleting anything


def test_the_dry_run_check_writes_nothing_and_says_what_would_happen(tmp_path):
    out = tmp_path / "run"
    assert check_output_dir(out, resume=None, overwrite=False) == f"{out}: new folder; the run starts"
    assert not out.exists()
    save(out, make_parts(seed=0), step=1)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(CheckpointError, match="holds a previous dpo-train run"):
        check_output_dir(out, resume=None, overwrite=False)
    assert "--overwrite deletes the" in check_output_dir(out, resume=None, overwrite=True)
    assert check_output_dir(out, resume=True, overwrite=False) == f"{out}: the run resumes"
    assert sorted(p.name for p in out.rglob("*")) == before


def test_resume_skips_damaged_checkpoints_naming_them_and_refuses_when_none_is_left(tmp_path):
    out = tmp_path / "run"
    parts = make_parts(seed=0)
    for step in (1, 2, 3):
        save(out, parts, step=step)
    (out / "checkpoints" / "step-000003" / "manifest.json").write_text('{"format": ')  # truncated
    (out / "checkpoints" / "step-000002" / "state.json").write_text("{}")  # does not match its manifest
    messages = []
    assert find_checkpoint(out, True, messages.append).step == 1
    assert [m.split(": ")[3] for m in messages] == [str(out / "checkpoints" / "step-000003" / "manifest.json"),
                                                    str(out / "checkpoints" / "step-000002" / "state.json")]
    assert scan_checkpoints(out)[1][0][0] == out / "checkpoints" / "step-000003"
    (out / "checkpoints" / "step-000001" / "run.json").unlink()
    with pytest.raises(CheckpointError, match=r"(?s)no usable checkpoint .*step-000003.*step-000002.*step-000001"):
        find_checkpoint(out, True, messages.append)
    assert find_checkpoint(tmp_path / "empty", True) is None  # nothing at all: the run starts from step 0


def test_cleaning_removes_what_a_killed_run_left_and_only_that(tmp_path):
    out = tmp_path / "run"
    parts = make_parts(seed=0)
    for step in (1, 2):
        save(out, parts, step=step)
    directory = RunDirectory.read(out)
    (out / "checkpoints" / "step-000001" / "manifest.json").unlink()  # a rotation cut short
    (out / "checkpoints" / "step-000001" / "notes.txt").write_text("mine")
    directory.record(scratch=["checkpoints/.tmp-step-000003"])  # a save cut short
    (out / "checkpoints" / ".tmp-step-000003").mkdir()
    (out / "checkpoints" / ".tmp-step-000003" / "rng.json").write_text("{}")
    (out / "checkpoints" / ".tmp-step-000009").mkdir()  # not recorded: not dpo-train's
    messages = []
    clean_incomplete_checkpoints(directory, messages.append)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [".tmp-step-000009", "step-000001",
                                                                       "step-000002"]
    assert [p.name for p in (out / "checkpoints" / "step-000001").iterdir()] == ["notes.txt"]
    assert "kept checkpoints/step-000001/notes.txt (not written by dpo-train)" in messages[-1]
    assert load_checkpoint(out / "checkpoints" / "step-000002").step == 2


def test_rewind_metrics_drops_records_after_the_step_and_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"split": "eval", "step": 0}, {"split": "train", "step": 1}, {"split": "train", "step": 2},
             {"split": "eval", "step": 2}, {"split": "train", "step": 3, "loss": float("nan")}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"split": "tra')
    assert rewind_metrics(path, 2) == 2
    assert [json.loads(line) for line in path.read_text().splitlines()] == lines[:4]
    assert rewind_metrics(path, 2) == 0
    # At the run's last step the evaluation at that step is the closing one, written after the checkpoint.
    assert rewind_metrics(path, 2, final=True) == 1
    assert [json.loads(line) for line in path.read_text().splitlines()] == lines[:3]
    assert rewind_metrics(tmp_path / "absent.jsonl", 5) == 0


def test_loop_state_round_trips_through_json_including_nan():
    state = LoopState(step=3, grad_norm=float("nan"), window_sums={"loss": float("inf")})
    back = LoopState.from_dict(json.loads(json.dumps(asdict(state))), "state.json")
    assert back.step == 3 and back.window_sums == {"loss": float("inf")}
    assert back.grad_norm != back.grad_norm  # NaN survives as NaN
    with pytest.raises(CheckpointError, match="state.json: missing epoch"):
        LoopState.from_dict({k: v for k, v in asdict(state).items() if k != "epoch"}, "state.json")


# ---------------------------------------------------------------------------------------- signals


def test_the_first_signal_is_recorded_and_the_handlers_are_restored():
    previous = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == signal.SIGTERM  # recorded, nothing raised: the step goes on
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_key_added_since_a_checkpoint_at_its_none_default_is_no_difference():
    from dpo.train.checkpoint import recipe_differences

    saved = {"recipe": {"model": {"path": "m", "dtype": "float32"}, "lora": {"target_modules": ["q_proj"]}}}
    now = {"model": {"path": "m", "dtype": "float32", "adapter": None}, "online": None,
           "lora": {"target_modules": ["q_proj"]}}
    assert recipe_differences(saved, now) == []
    now["model"]["adapter"] = "runs/sft/adapter"
    assert recipe_differences(saved, now) == ["model.adapter: '(absent)' in the checkpoint, 'runs/sft/adapter' now"]
