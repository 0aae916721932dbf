"""Faults injected into real (tiny, CPU) training runs: kills, damaged checkpoints, changed settings,
non-finite losses, signals. Each asserts the outcome, and a resumed run must match the uninterrupted one
bit for bit: same metrics (but throughput), same final adapter and optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpo.model.logprobs as logprobs
import dpo.train.checkpoint as ckpt
import dpo.train.setup as train_setup
from dpo.cli import main
from dpo.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from tests.helpers import Crash, build_tiny_model, crash_at_micro_batch, write_pairs, write_recipe

ROOT = Path(__file__).resolve().parents[2]
# 18 pairs in micro-batches of 4 make 5 per epoch (the last of 2 pairs); with grad_accum 2 an epoch has
# 2 steps and step 3 takes the last micro-batch of epoch 0 and the first of epoch 1. 2 epochs: 4 steps.
TRAIN = {"epochs": 2, "batch_size": 4, "grad_accum": 2, "lr": 0.003, "warmup_steps": 1, "log_every": 1,
         "seed": 3, "save_every": 1, "keep_last": 10}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every run of this module (subprocesses included, via OMP_NUM_THREADS) computes with one thread:
    bit-exact comparisons need the same thread count on both sides, and tiny matrices gain nothing from more."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    train, eval_ = write_pairs(root / "data", train=18, eval=8)
    return {"model": build_tiny_model(root / "model"), "train": train, "eval": eval_}


def make_recipe(directory: Path, assets: dict[str, Path], **train) -> Path:
    tree = {
        "model": {"path": str(assets["model"])},
        "data": {"train": str(assets["train"]), "eval": str(assets["eval"]), "max_length": 48,
                 "max_prompt_length": 32},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},  # dropout: the torch generator matters to the result
        "loss": {"name": "dpo", "beta": 0.5},
        "train": {**TRAIN, **train},
        "reference": {"batch_size": 8},
        "output": {"dir": str(directory / "out")},
    }
    directory.mkdir(parents=True, exist_ok=True)
    return write_recipe(directory / "recipe.yaml", tree)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def comparable_metrics(out: Path) -> list[dict]:
    """Every metric record but throughput, which is wall-clock."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_jsonl(out / "metrics.jsonl")]


def final_state(out: Path) -> dict:
    latest = latest_checkpoint(out)
    manifest = json.loads((latest / "manifest.json").read_text())
    return {"adapter": load_file(out / "adapter" / "adapter_model.safetensors"),
            "optimizer": manifest["files"]["optimizer.safetensors"]["sha256"],
            "step": manifest["step"]}


def assert_same_run(out: Path, reference: dict) -> None:
    assert comparable_metrics(out) == reference["metrics"]
    state = final_state(out)
    assert state["step"] == reference["state"]["step"] == 4
    assert state["optimizer"] == reference["state"]["optimizer"]
    assert state["adapter"].keys() == reference["state"]["adapter"].keys()
    for key, tensor in state["adapter"].items():
        assert torch.equal(tensor, reference["state"]["adapter"][key]), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, assets) -> dict:
    directory = tmp_path_factory.mktemp("uninterrupted")
    main([str(make_recipe(directory, assets))])
    out = directory / "out"
    return {"metrics": comparable_metrics(out), "state": final_state(out)}


def crash_while_writing(monkeypatch, step: int, write: int) -> None:
    """Make the ``write``-th file write of step ``step``'s checkpoint crash the run."""
    real = ckpt._sync_file
    seen = []

    def sync(path):
        if f"step-{step:06d}" in str(path):
            seen.append(path)
            if len(seen) == write:
                raise Crash(f"killed while writing {path}")
        real(path)

    monkeypatch.setattr(ckpt, "_sync_file", sync)


# --------------------------------------------------------------------------------- bit-exact resume


@pytest.mark.parametrize("stop, resumes_at", [
    ("checkpoint write", 2),  # the step-3 checkpoint is cut short: resume mid-epoch (epoch 0, micro-batch 4)
    ("micro-batch 6", 2),     # mid-accumulation, across the epoch boundary: step 3 half done is lost
    ("micro-batch 7", 3),     # start of step 4: epoch 1, just after the boundary
])
def test_a_resumed_run_matches_the_uninterrupted_one_bit_for_bit(tmp_path, assets, uninterrupted, monkeypatch,
                                                                   capsys, stop, resumes_at):
    recipe = make_recipe(tmp_path, assets)
    if stop == "checkpoint write":
        crash_while_writing(monkeypatch, step=3, write=3)
    else:
        crash_at_micro_batch(monkeypatch, int(stop.split()[-1]))
    with pytest.raises(Crash):
        main([str(recipe)])
    monkeypatch.undo()
    capsys.readouterr()
    main([str(recipe), "--resume"])
    assert f"resumed from {tmp_path / 'out' / 'checkpoints' / f'step-{resumes_at:06d}'}" in capsys.readouterr().out
    assert_same_run(tmp_path / "out", uninterrupted)


# ---------------------------------------------------------------------------- refused resumes


def run_cli_error(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    return info.value.code, capsys.readouterr().err


def test_resume_with_a_changed_beta_is_refused_and_force_overrides(tmp_path, assets, capsys):
    recipe = make_recipe(tmp_path, assets, save_every=None)
    main([str(recipe), "--set", "train.max_steps=2"])
    code, err = run_cli_error([str(recipe), "--resume", "--set", "train.max_steps=2", "--set", "loss.beta=0.3"],
                              capsys)
    assert code == 2 and "loss.beta: 0.5 in the checkpoint, 0.3 now" in err and "--force" in err
    assert "Traceback" not in err
    main([str(recipe), "--resume", "--force", "--set", "train.max_steps=2", "--set", "loss.beta=0.3"])
    assert "warning: --force" in capsys.readouterr().out


def test_resume_with_changed_data_is_refused_but_moved_data_is_not(tmp_path, assets, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(assets["train"].read_text())
    recipe = make_recipe(tmp_path, {**assets, "train": data}, save_every=None, max_steps=1)
    main([str(recipe)])
    moved = tmp_path / "moved.jsonl"
    moved.write_text(data.read_text())
    main([str(recipe), "--resume", "--set", f"data.train={moved}"])  # same content elsewhere: fine
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[0]["chosen"] += " indeed"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, err = run_cli_error([str(recipe), "--resume"], capsys)
    assert code == 2 and "data.train: tokenized data differ" in err
    assert "reference.train: reference log-probs" in err  # they were computed from the old data


def test_a_damaged_checkpoint_is_named_and_skipped_and_an_earlier_one_resumes_exactly(tmp_path, assets, uninterrupted,
                                                                                      capsys):
    recipe = make_recipe(tmp_path, assets)
    main([str(recipe)])
    damaged = tmp_path / "out" / "checkpoints" / "step-000004" / "optimizer.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    code, err = run_cli_error([str(recipe), "--resume", str(damaged.parent)], capsys)  # named: refused
    assert code == 2 and f"{damaged}: content does not match the manifest's SHA-256" in err
    code, err = run_cli_error([str(recipe), "--resume", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "no such checkpoint folder" in err
    main([str(recipe), "--resume"])  # the newest valid one, saying which it skipped
    out = capsys.readouterr().out
    assert f"warning: --resume: skipped a damaged checkpoint: {damaged}: content does not match" in out
    assert f"resumed from {tmp_path / 'out' / 'checkpoints' / 'step-000003'}" in out
    assert_same_run(tmp_path / "out", uninterrupted)  # the damaged step-4 checkpoint was written anew
    main([str(recipe), "--resume", str(tmp_path / "out" / "checkpoints" / "step-000001")])
    assert_same_run(tmp_path / "out", uninterrupted)


def test_output_directory_rules_from_the_command_line(tmp_path, assets, capsys):
    recipe = make_recipe(tmp_path, assets, max_steps=1, save_every=None)
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("not ours")
    code, err = run_cli_error([str(recipe)], capsys)
    assert code == 2 and "not created by dpo-train" in err
    (out / "thesis.tex").unlink()
    main([str(recipe)])
    code, err = run_cli_error([str(recipe)], capsys)
    assert code == 2 and "holds a previous dpo-train run" in err
    main([str(recipe), "--overwrite"])
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1, 1]  # one run's records, not two
    assert [step for _, step, _ in list_checkpoints(out)] == [1]
    main([str(recipe), "--resume"])  # a finished run: evaluated and saved again, its records not repeated
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1, 1]


# ------------------------------------------------------------------------------- numerical faults


def poison(monkeypatch, steps: set[int], grad_accum: int) -> list[dict[str, torch.Tensor]]:
    """Make every micro-batch of the given steps' losses NaN; returns the trainable parameters as each
    training micro-batch saw them."""
    real = train_setup.batch_loss
    seen: list[dict[str, torch.Tensor]] = []

    def batch_loss(policy, *args):
        out = real(policy, *args)
        if not policy.training:
            return out
        seen.append({n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad})
        step = (len(seen) - 1) // grad_accum + 1
        if step in steps:
            out = dataclasses.replace(out, losses=out.losses * float("nan"))
        return out

    monkeypatch.setattr(train_setup, "batch_loss", batch_loss)
    return seen


def test_a_nan_step_is_skipped_counted_and_logged_as_nan(tmp_path, assets, monkeypatch, capsys):
    recipe = make_recipe(tmp_path, assets)
    seen = poison(monkeypatch, {2}, grad_accum=2)
    main([str(recipe)])
    # Micro-batches 3-4 are step 2; micro-batch 5 sees the parameters after it: exactly those before it.
    assert all(torch.equal(seen[4][k], seen[2][k]) for k in seen[2])
    assert not all(torch.equal(seen[6][k], seen[4][k]) for k in seen[4])  # step 3, a good one, moves them
    records = {r["step"]: r for r in read_jsonl(tmp_path / "out" / "metrics.jsonl") if r["split"] == "train"}
    assert math.isnan(records[2]["loss"]) and math.isnan(records[2]["grad_norm"])
    assert (records[2]["bad_steps"], records[2]["bad_steps_consecutive"]) == (1, 1)
    assert (records[3]["bad_steps"], records[3]["bad_steps_consecutive"]) == (1, 0)
    assert records[2]["lr"] == records[1]["lr"]  # the schedule did not advance
    assert math.isfinite(records[3]["loss"]) and math.isfinite(records[4]["loss"])
    assert '"loss": NaN' in (tmp_path / "out" / "metrics.jsonl").read_text()  # written as it is
    assert "warning: step 2: non-finite loss or gradient norm (loss=nan" in capsys.readouterr().out
    # 4 steps, 1 skipped: the optimizer took 3; no checkpoint at the bad step.
    optimizer = load_file(latest_checkpoint(tmp_path / "out") / "optimizer.safetensors")
    assert float(optimizer["0.step"]) == 3.0
    assert [step for _, step, _ in list_checkpoints(tmp_path / "out")] == [1, 3, 4]


def test_nan_at_every_step_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, assets, monkeypatch, capsys):
    recipe = make_recipe(tmp_path, assets, max_bad_steps=2)
    poison(monkeypatch, {3, 4}, grad_accum=2)
    code, err = run_cli_error([str(recipe)], capsys)
    out = tmp_path / "out"
    good = out / "checkpoints" / "step-000002"
    assert code == 3
    assert "stopped at step 4: 2 steps in a row had a non-finite loss or gradient norm" in err
    assert f"the last good checkpoint is {good}" in err
    assert latest_checkpoint(out) == good and load_checkpoint(good).step == 2
    assert not (out / "adapter").exists()
    records = [r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and math.isnan(records[-1]["loss"])
    assert records[-1]["bad_steps"] == 2


def test_the_loss_is_float32_with_a_bfloat16_model(tmp_path, assets, monkeypatch):
    recipe = make_recipe(tmp_path, assets, max_steps=1, save_every=None)
    real = logprobs.sequence_logprobs
    dtypes = []

    def sequence_logprobs(model, *args):
        sums, counts = real(model, *args)
        dtypes.append((next(model.parameters()).dtype, sums.dtype))
        return sums, counts

    def batch_loss(policy, *args):
        out = real_batch_loss(policy, *args)
        dtypes.append(("loss", out.losses.dtype))
        return out

    real_batch_loss = train_setup.batch_loss
    monkeypatch.setattr(logprobs, "sequence_logprobs", sequence_logprobs)
    real_packed = logprobs.packed_sequence_logprobs  # packed batches (train.packing) take this path

    def packed_sequence_logprobs(model, *args):
        sums, counts = real_packed(model, *args)
        dtypes.append((next(model.parameters()).dtype, sums.dtype))
        return sums, counts

    monkeypatch.setattr(logprobs, "packed_sequence_logprobs", packed_sequence_logprobs)
    monkeypatch.setattr(train_setup, "batch_loss", batch_loss)
    main([str(recipe), "--set", "model.dtype=bfloat16"])
    assert (torch.bfloat16, torch.float32) in dtypes  # a bfloat16 model's log-probs come out in float32
    assert {d for kind, d in dtypes if kind == "loss"} == {torch.float32}


# ------------------------------------------------------------------------------------------ signals


DRIVER = """
import sys, time
import dpo.train.setup as train_setup

real = train_setup.batch_loss

def slow_batch_loss(policy, *args):
    if policy.training:
        time.sleep(float(sys.argv[2]))  # slow training steps, so that signals land in the middle of one
    return real(policy, *args)

train_setup.batch_loss = slow_batch_loss
from dpo.cli import main
main([sys.argv[1]])
"""


def start_training(tmp_path: Path, recipe: Path, seconds_per_micro_batch: float) -> subprocess.Popen:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(driver), str(recipe), str(seconds_per_micro_batch)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_first_step(process: subprocess.Popen, metrics: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and '"split": "train"' in metrics.read_text():
            return
        if process.poll() is not None:
            raise AssertionError(f"training ended early:\n{process.communicate()[1]}")
        time.sleep(0.05)
    process.kill()
    raise AssertionError("no training step within the timeout")


def test_sigterm_finishes_the_step_checkpoints_exits_non_zero_and_resumes_exactly(tmp_path, assets, uninterrupted):
    recipe = make_recipe(tmp_path, assets, save_every=None)
    process = start_training(tmp_path, recipe, seconds_per_micro_batch=0.3)
    wait_for_first_step(process, tmp_path / "out" / "metrics.jsonl")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    assert "SIGTERM: finishing the current step, then writing a checkpoint" in err
    stopped = [line for line in err.splitlines() if "stopped by SIGTERM after step" in line]
    assert len(stopped) == 1 and "Traceback" not in err
    step = int(stopped[0].split("after step ")[1].split()[0])
    assert 1 <= step < 4
    checkpoint = load_checkpoint(latest_checkpoint(tmp_path / "out"))
    assert checkpoint.step == step
    main([str(recipe), "--resume", "--set", "train.save_every=1"])
    # The first run saved no periodic checkpoint, the resumed one did: the result does not depend on it.
    assert comparable_metrics(tmp_path / "out") == uninterrupted["metrics"]
    adapter = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(t, uninterrupted["state"]["adapter"][k]) for k, t in adapter.items())


def test_a_second_signal_exits_at_once_and_every_checkpoint_stays_valid(tmp_path, assets):
    recipe = make_recipe(tmp_path, assets, max_steps=50)
    process = start_training(tmp_path, recipe, seconds_per_micro_batch=1.0)
    wait_for_first_step(process, tmp_path / "out" / "metrics.jsonl")
    while latest_checkpoint(tmp_path / "out") is None and process.poll() is None:
        time.sleep(0.05)  # step 1's checkpoint is written right after its record
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT
    assert "SIGINT again: exiting now" in err and "stopped by SIGINT" not in err
    complete = list_checkpoints(tmp_path / "out")
    assert complete and all(load_checkpoint(folder).step == step for _, step, folder in complete)
