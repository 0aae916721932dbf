"""A reward margin column through the data path: carried to the batch, and part of what the data is;
missing or non-numeric margins are bad rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpo.data import DataError, collate_paired, prepare_data
from dpo.model import load_tokenizer
from dpo.recipe import DataConfig, ModelConfig
from tests.helpers import write_jsonl

QUICKSTART = Path("recipes/quickstart")


def margin_rows() -> list[dict]:
    return [{"prompt": f"Is {n} even or odd? Answer:", "chosen": " even" if n % 2 == 0 else " odd",
             "rejected": " odd" if n % 2 == 0 else " even", "gap": 0.25 * i} for i, n in enumerate(range(20, 28))]


def test_margin_column_is_carried_to_the_batch(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", margin_rows())
    tokenizer = load_tokenizer(ModelConfig(path=str(QUICKSTART / "model")))
    cfg = DataConfig(train=str(path), eval_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    data = prepare_data(cfg, tokenizer, unpaired=False, seed=0, log=lambda _: None, margin_column="gap")
    batch = collate_paired([data.train[i] for i in (2, 5, 7)], pad_token_id=tokenizer.pad_token_id)
    assert batch["margin"].tolist() == [0.5, 1.25, 1.75]
    without = prepare_data(cfg, tokenizer, unpaired=False, seed=0, log=lambda _: None)
    assert "margin" not in collate_paired([without.train[0]], pad_token_id=tokenizer.pad_token_id)
    assert without.train_fingerprint != data.train_fingerprint  # a margin is part of what the data is


def test_missing_or_non_numeric_margins_are_bad_rows(tmp_path):
    rows = margin_rows()
    rows[3]["gap"] = "high"
    del rows[5]["gap"]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    tokenizer = load_tokenizer(ModelConfig(path=str(QUICKSTART / "model")))
    cfg = DataConfig(train=str(path), eval_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError) as info:
        prepare_data(cfg, tokenizer, unpaired=False, seed=0, log=lambda _: None, margin_column="gap")
    message = str(info.value)
    assert "line 4: non-numeric value: 'gap' is 'high'" in message and "line 6: missing field" in message
    with pytest.raises(DataError, match="reward.margin_column is 'rating', but there is no such column"):
        prepare_data(cfg, tokenizer, unpaired=False, seed=0, log=lambda _: None, margin_column="rating")
