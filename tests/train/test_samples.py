"""Held-out answers in a run: ``samples.jsonl``, the ``generate/*`` metrics, the log line, and no effect on training."""

from __future__ import annotations

import json
from pathlib import Path

from dpo.cli import main
from dpo.quickstart import gold
from dpo.train.output_dir import MARKER, SAMPLES_FILE
from tests.train.test_loop import read_jsonl, tiny_recipe


def answering_recipe(tmp_path: Path, **sections) -> Path:
    return tiny_recipe(tmp_path, train_pairs=32, eval_pairs=16, **sections)


def test_samples_jsonl_holds_greedy_answers_at_each_evaluation_and_every_sample_every_steps(tmp_path, capsys):
    recipe = answering_recipe(tmp_path, train={"eval_every": 2, "sample_every": 1},
                              eval={"generate": 2, "samples": 2, "max_new_tokens": 6, "gold": "dpo.quickstart:gold"})
    main([str(recipe)])
    out = tmp_path / "out"
    samples = read_jsonl(out / SAMPLES_FILE)
    # Evaluations at 0, 2 and 4 (the last); sample_every between them, not at an evaluation's step.
    assert [(s["split"], s["step"]) for s in samples] == [
        (split, step) for split, step in [("eval", 0), ("train", 1), ("eval", 2), ("train", 3), ("eval", 4)]
        for _ in range(2)]
    held_out = [json.loads(line)["prompt"] for line in (tmp_path / "data" / "eval.jsonl").read_text().splitlines()]
    first_two = list(dict.fromkeys(held_out))[:2]
    assert [s["prompt"] for s in samples] == first_two * 5
    for sample in samples:
        assert isinstance(sample["completion"], str) and 0 <= sample["tokens"] <= 6
        assert sample["ended"] or sample["tokens"] == 6
        assert sample["gold"] == gold(sample["prompt"], sample["completion"])
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for record in evals:
        answered = [s for s in samples if s["split"] == "eval" and s["step"] == record["step"]]
        assert record["generate/length"] == sum(s["tokens"] for s in answered) / 2
        assert record["generate/eos"] == sum(s["ended"] for s in answered) / 2
        assert record["generate/gold"] == sum(s["gold"] for s in answered) / 2
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["eval_before"]["generate/length"] == evals[0]["generate/length"]
    assert SAMPLES_FILE in json.loads((out / MARKER).read_text())["written"]["files"]
    logged = capsys.readouterr().out
    assert f"sample at step 0: {first_two[0]!r} -> " in logged and f"sample at step 3: {first_two[0]!r}" in logged


def test_answering_changes_nothing_in_training(tmp_path):
    """Dropout draws from the global generator; the answers are decoded under a saved and restored state."""
    lora = {"dropout": 0.2}
    quiet = answering_recipe(tmp_path / "quiet", lora=lora, eval={"samples": 0})
    answering = answering_recipe(tmp_path / "answering", lora=lora, train={"sample_every": 1, "log_every": 1},
                                 eval={"generate": 3, "samples": 2, "max_new_tokens": 4})
    main([str(quiet), "--set", "train.log_every=1"])
    main([str(answering)])
    losses = {name: [r["loss"] for r in read_jsonl(tmp_path / name / "out" / "metrics.jsonl") if r["split"] == "train"]
              for name in ("quiet", "answering")}
    assert len(losses["quiet"]) == 4 and losses["quiet"] == losses["answering"]
    assert not (tmp_path / "quiet" / "out" / SAMPLES_FILE).exists()
