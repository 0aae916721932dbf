"""``dpo-train pairs``: best against worst of a model's own samples, what is dropped and counted, ready to train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpo.cli import main
from dpo.pairs import choose_pair
from tests.helpers import build_tiny_model, write_jsonl, write_recipe

# Scores the tiny random model's samples so that they differ: how close the answer is to 3 characters.
RULES = "def closeness(prompt, completion):\n    return -abs(len(completion) - 3)\n"


def test_choose_pair_takes_best_and_worst_and_names_why_there_is_none():
    assert choose_pair([(0.5, "a"), (2.0, "b"), (2.0, "c"), (-1.0, "d"), (-1.0, "e")], 0.0) == ((2.0, "b"), (-1.0, "d"))
    assert choose_pair([(1.0, "a")], 0.0) == "fewer than 2 usable samples"
    assert choose_pair([(1.0, "a"), (1.0, "b"), (1.0, "c")], 0.0) == "all samples scored the same"
    assert choose_pair([(1.0, "a"), (1.2, "b")], 0.5) == "a tie (best - worst <= --min-margin 0.5)"
    assert choose_pair([(1.0, "a b"), (2.0, " a  b\n")], 0.0) == "best and worst differ only in whitespace"


@pytest.fixture(scope="module")
def setting(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pairs")
    model = build_tiny_model(root / "model")
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"Parity of {n}:"} for n in range(100, 124)])
    (root / "rules.py").write_text(RULES)
    return {"root": root, "model": model, "prompts": prompts, "rules": root / "rules.py"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pairs_from_a_model_folder_rank_by_the_gold_scorer_and_train(setting, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    main(["pairs", str(setting["model"]), "--prompts", str(setting["prompts"]), "--scorer",
          f"{setting['rules']}:closeness", "--out", str(out), "--k", "4", "--max-new-tokens", "6",
          "--keep-unfinished"])
    rows = read_jsonl(out)
    logged = capsys.readouterr().out
    assert 0 < len(rows) <= 24
    dropped = sum(int(line.split()[1]) for line in logged.splitlines() if "prompts without a pair" in line)
    assert len(rows) + dropped == 24
    assert f"wrote {len(rows)} pairs from 24 prompts to {out}" in logged
    exec_globals: dict = {}
    exec(RULES, exec_globals)
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}
        assert isinstance(row["chosen"], str) and row["prompt"].startswith("Parity of")
        assert row["score_chosen"] == exec_globals["closeness"](row["prompt"], row["chosen"])
        assert row["score_rejected"] == exec_globals["closeness"](row["prompt"], row["rejected"])
        assert row["score_chosen"] > row["score_rejected"]
    # The same seed samples the same pairs; the file trains as it is.
    again = tmp_path / "again.jsonl"
    main(["pairs", str(setting["model"]), "--prompts", str(setting["prompts"]), "--scorer",
          f"{setting['rules']}:closeness", "--out", str(again), "--k", "4", "--max-new-tokens", "6",
          "--keep-unfinished"])
    assert again.read_text() == out.read_text()
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "model": {"path": str(setting["model"])}, "data": {"train": str(out), "eval_fraction": 0.25},
        "train": {"max_steps": 2, "batch_size": 4}, "eval": {"samples": 0},
        "output": {"dir": str(tmp_path / "run")}})
    main([str(recipe)])
    assert json.loads((tmp_path / "run" / "final_metrics.json").read_text())["steps"] == 2


def test_unfinished_samples_are_left_out_and_counted(setting, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    main(["pairs", str(setting["model"]), "--prompts", str(setting["prompts"]), "--scorer",
          f"{setting['rules']}:closeness", "--out", str(out), "--k", "3", "--max-new-tokens", "2"])
    logged = capsys.readouterr().out
    left_out = [line for line in logged.splitlines() if "samples left out: cut at --max-new-tokens 2" in line]
    assert left_out and int(left_out[0].split()[1]) > 0
    assert "prompts without a pair: fewer than 2 usable samples" in logged


def test_a_reward_run_can_score(setting, tmp_path):
    reward = write_recipe(tmp_path / "reward.yaml", {
        "task": "reward", "model": {"path": str(setting["model"])},
        "data": {"train": str(tmp_path / "rm.jsonl"), "eval_fraction": 0.0},
        "train": {"max_steps": 1, "batch_size": 4}, "output": {"dir": str(tmp_path / "rm")}})
    write_jsonl(tmp_path / "rm.jsonl", [{"prompt": f"Q{n}", "chosen": " yes", "rejected": " no"} for n in range(8)])
    main([str(reward)])
    out = tmp_path / "pairs.jsonl"
    main(["pairs", str(setting["model"]), "--prompts", str(setting["prompts"]), "--scorer", str(tmp_path / "rm"),
          "--out", str(out), "--k", "3", "--max-new-tokens", "5", "--keep-unfinished"])
    rows = read_jsonl(out)
    assert len(rows) == 24  # a reward model's scores are never all equal
    assert all(row["score_chosen"] > row["score_rejected"] for row in rows)


def test_chat_prompts_give_conversational_pairs(setting, tmp_path):
    out = tmp_path / "pairs.jsonl"
    main(["pairs", str(setting["model"]), "--prompts", str(setting["prompts"]), "--scorer",
          f"{setting['rules']}:closeness", "--out", str(out), "--k", "4", "--max-new-tokens", "5",
          "--keep-unfinished", "--layout", "conversational"])
    rows = read_jsonl(out)
    assert rows
    for row in rows:
        assert row["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}]
        assert [m["role"] for m in row["chosen"]] == ["assistant"] and row["score_chosen"] > row["score_rejected"]


def test_pairs_errors_name_what_to_change(setting, tmp_path, capsys):
    taken = tmp_path / "taken.jsonl"
    taken.write_text("mine\n")
    base = ["pairs", str(setting["model"]), "--prompts", str(setting["prompts"])]
    for args, expected in [
        (["--scorer", f"{setting['rules']}:closeness", "--out", str(taken)], "exists; choose another file or pass --overwrite"),
        (["--scorer", f"{setting['rules']}:absent", "--out", str(tmp_path / "o.jsonl")], "--scorer: "),
        (["--scorer", "no_such_module:score", "--out", str(tmp_path / "o.jsonl")], "no module named 'no_such_module'"),
        (["--scorer", f"{setting['rules']}:closeness", "--out", str(tmp_path / "o.jsonl"), "--layout", "sideways"],
         "--layout 'sideways'"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(base + args)
        assert exit_info.value.code == 2
        assert expected in capsys.readouterr().err
    assert taken.read_text() == "mine\n"
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(SystemExit):
        main(["pairs", str(setting["model"]), "--prompts", str(chat), "--scorer", f"{setting['rules']}:closeness",
              "--out", str(tmp_path / "c.jsonl"), "--layout", "explicit"])
    assert "--layout explicit: the prompts are chat messages" in capsys.readouterr().err


def test_a_gguf_file_a_recipe_and_a_run_are_sources_too(setting, tmp_path, capsys):
    from tests.helpers import build_tiny_gguf

    pytest.importorskip("gguf")
    gguf = build_tiny_gguf(tmp_path / "gguf", "tiny.gguf")
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "model": {"path": str(gguf.parent), "gguf_file": gguf.name}, "data": {"train": str(setting["prompts"])},
        "train": {"max_steps": 1, "batch_size": 4}, "output": {"dir": str(tmp_path / "run")}})
    common = ["--prompts", str(setting["prompts"]), "--scorer", f"{setting['rules']}:closeness", "--k", "2",
              "--max-new-tokens", "4", "--keep-unfinished"]
    main(["pairs", str(gguf), "--out", str(tmp_path / "from-file.jsonl"), *common])
    main(["pairs", str(recipe), "--out", str(tmp_path / "from-recipe.jsonl"), *common])
    # The same network, tokenizer and seed: the same pairs.
    assert (tmp_path / "from-file.jsonl").read_text() == (tmp_path / "from-recipe.jsonl").read_text()
    logged = capsys.readouterr().out
    assert f"from {gguf.parent} (tiny.gguf) (the base of {recipe})" in logged
