"""The output directory's marker: every path recorded before it is written, and deletion that touches only
what was recorded, never through a symlink, never an input of the run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dpo.train.output_dir import (
    LOCK_FILE,
    MARKER,
    CheckpointError,
    RunDirectory,
    input_conflicts,
    probe_lock,
    take_lock,
    taken_outputs,
)


def marker_of(root: Path) -> dict:
    return json.loads((root / MARKER).read_text())["written"]


def test_paths_are_recorded_before_they_are_written_and_survive_a_reread(tmp_path):
    directory = RunDirectory.create(tmp_path / "out")
    directory.write_text("recipe.yaml", "a: 1\n", "resolved recipe")
    directory.mkdir("checkpoints/step-000001")
    directory.record_tree("checkpoints/step-000002", ["adapter/adapter_model.safetensors", "state.json"])
    written = marker_of(tmp_path / "out")
    assert written["files"] == ["checkpoints/step-000002/adapter/adapter_model.safetensors",
                                "checkpoints/step-000002/state.json", "recipe.yaml"]
    assert written["dirs"] == ["checkpoints", "checkpoints/step-000001", "checkpoints/step-000002",
                               "checkpoints/step-000002/adapter"]
    again = RunDirectory.read(tmp_path / "out")
    assert (again.files, again.dirs) == (directory.files, directory.dirs)
    assert again.owns("recipe.yaml") and again.owns("checkpoints") and not again.owns("checkpoints/step-000002")


def test_remove_deletes_only_recorded_regular_files_and_empty_recorded_folders(tmp_path):
    directory = RunDirectory.create(tmp_path / "out")
    directory.mkdir("adapter")
    directory.write_text("adapter/config.json", "{}", "adapter")
    (tmp_path / "out" / "adapter" / "mine.bin").write_bytes(b"user")
    directory.write_text("metrics.jsonl", "", "metrics")
    (tmp_path / "out" / ".tmp-metrics.jsonl").write_text("torn")  # left by an interrupted atomic write
    kept = directory.remove("adapter")
    assert kept == ["adapter/mine.bin"] and (tmp_path / "out" / "adapter" / "mine.bin").read_bytes() == b"user"
    assert not (tmp_path / "out" / "adapter" / "config.json").exists()
    assert directory.remove("metrics.jsonl") == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARKER, "adapter"]
    assert marker_of(tmp_path / "out") == {"files": [], "dirs": [], "scratch": []}


def test_nothing_is_reached_through_a_symlink(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "state.json").write_text("precious")
    directory = RunDirectory.create(tmp_path / "out")
    directory.record_tree("checkpoints/step-000001", ["state.json"])
    (tmp_path / "out" / "checkpoints").symlink_to(outside)  # a recorded folder replaced by a link
    assert directory.remove("checkpoints") == []
    assert (outside / "state.json").read_text() == "precious" and (tmp_path / "out" / "checkpoints").is_symlink()
    directory.write_text("final_metrics.json", "{}", "final metrics")
    os.unlink(tmp_path / "out" / "final_metrics.json")
    (tmp_path / "out" / "final_metrics.json").symlink_to(outside / "state.json")  # a recorded file replaced
    assert not directory.owns("final_metrics.json")
    assert directory.remove("final_metrics.json") == ["final_metrics.json"]
    assert (outside / "state.json").read_text() == "precious"


def test_a_scratch_folder_goes_whole_and_a_rename_moves_its_records(tmp_path):
    directory = RunDirectory.create(tmp_path / "out")
    directory.record(scratch=["checkpoints/.tmp-step-000003"])
    (tmp_path / "out" / "checkpoints" / ".tmp-step-000003" / "adapter").mkdir(parents=True)
    (tmp_path / "out" / "checkpoints" / ".tmp-step-000003" / "adapter" / "x").write_text("")
    directory.remove("checkpoints/.tmp-step-000003")
    assert not (tmp_path / "out" / "checkpoints" / ".tmp-step-000003").exists()
    directory.mkdir("checkpoints/step-000004")
    directory.write_text("checkpoints/step-000004/state.json", "{}", "checkpoint")
    directory.rename("checkpoints/step-000004", "checkpoints/.old-step-000004")
    assert marker_of(tmp_path / "out")["files"] == ["checkpoints/.old-step-000004/state.json"]
    assert (tmp_path / "out" / "checkpoints" / ".old-step-000004" / "state.json").is_file()


def test_write_folder_records_each_file_a_library_writes_and_refuses_a_foreign_one(tmp_path):
    directory = RunDirectory.create(tmp_path / "out")

    def fill(folder: Path) -> None:
        (folder / "adapter_model.safetensors").write_bytes(b"w")
        (folder / "sub").mkdir()
        (folder / "sub" / "tokenizer.json").write_text("{}")

    directory.write_folder("adapter", fill, "adapter")
    assert sorted(p for p in directory.files) == ["adapter/adapter_model.safetensors", "adapter/sub/tokenizer.json"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARKER, "adapter"]  # no scratch left
    directory.write_folder("adapter", fill, "adapter")  # its own files are replaced
    os.unlink(tmp_path / "out" / "adapter" / "sub" / "tokenizer.json")
    directory.forget("adapter/sub/tokenizer.json")
    (tmp_path / "out" / "adapter" / "sub" / "tokenizer.json").write_text("the user's")
    with pytest.raises(CheckpointError, match=r"adapter/sub/tokenizer.json was not written by dpo-train"):
        directory.write_folder("adapter", fill, "adapter")
    assert (tmp_path / "out" / "adapter" / "sub" / "tokenizer.json").read_text() == "the user's"
    assert not (tmp_path / "out" / ".tmp-adapter").exists()


@pytest.mark.parametrize("recorded", ["../outside.txt", "/etc/passwd", "a/../../b", ".", ""])
def test_a_marker_that_points_outside_is_refused(tmp_path, recorded):
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text(json.dumps({"created_by": "dpo-train", "written": {"files": [recorded]}}))
    with pytest.raises(CheckpointError, match="not a path inside the output directory"):
        RunDirectory.read(out)


def test_a_foreign_or_unreadable_marker_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text("{")
    with pytest.raises(CheckpointError, match="not a readable dpo-train marker"):
        RunDirectory.read(out)
    (out / MARKER).write_text('{"created_by": "someone"}')
    with pytest.raises(CheckpointError, match="not a dpo-train marker"):
        RunDirectory.read(out)


def test_taken_output_names_and_inputs_inside_outputs(tmp_path):
    out = tmp_path / "out"
    directory = RunDirectory.create(out)
    directory.write_text("recipe.yaml", "", "resolved recipe")
    (out / "metrics.jsonl").write_text("")  # not recorded: the user's
    (out / "adapter").mkdir()
    assert taken_outputs(out, directory) == ["metrics.jsonl", "adapter"]
    inputs = [("the recipe", out / "recipe.yaml"), ("data.train", out / "adapter" / "train.jsonl"),
              ("model.path", tmp_path / "model")]
    assert [line.split(" (")[0] for line in input_conflicts(out, inputs, directory, resume=False)] == [
        "the recipe", "data.train"]
    # The run's own recipe read back to resume is fine: a resume deletes nothing.
    assert [line.split(" (")[0] for line in input_conflicts(out, inputs, directory, resume=True)] == ["data.train"]


def test_the_lock_names_its_holder_and_a_probe_takes_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    probe_lock(out)  # no lock file: nothing to probe, nothing created
    assert not (out / LOCK_FILE).exists()
    lock = take_lock(out)
    with pytest.raises(CheckpointError, match=rf"in use by another dpo-train run \(process {os.getpid()} holds"):
        probe_lock(out)
    lock.release()
    probe_lock(out)
    take_lock(out).release()
