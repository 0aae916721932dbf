"""Every data card's recipe snippet is a valid ``data:`` section that loads the matching fixture."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from dpo.data import prepare_data
from dpo.recipe import DataConfig
from tests.data_helpers import FIXTURES, build_word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CARDS = ROOT / "data_cards"
# card -> (fixture standing in for the published data, unpaired loss, layout the card promises)
FIXTURE_OF = {
    "hh-rlhf.md": ("hh_rlhf_style.jsonl", False, "hh_rlhf"),
    "ultrafeedback-binarized.md": ("ultrafeedback_binarized_style.jsonl", False, "message_lists"),
    "stack-exchange-paired.md": ("stack_exchange_paired_style.jsonl", False, "explicit"),
    "shp.md": ("shp_style.jsonl", False, "explicit"),
    "kto-mix.md": ("kto_unpaired.jsonl", True, "unpaired"),
    "plain-prompt-chosen-rejected.md": ("explicit_prompt.jsonl", False, "explicit"),
    "sft-demonstrations.md": ("demonstrations.jsonl", False, "demonstrations"),
}
# Cards that describe something other than a data set of the training layouts (tested below).
OTHER_CARDS = {"quickstart-arithmetic.md", "quickstart-gold.md"}


def snippet(card: Path) -> dict:
    """The ``data:`` section of the card's last YAML block."""
    blocks = re.findall(r"```yaml\n(.*?)```", card.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, f"{card.name} has no yaml snippet"
    tree = yaml.safe_load(blocks[-1])
    assert set(tree) == {"data"}, f"{card.name}: the snippet should be a data: section"
    return tree["data"]


def test_every_card_is_tested():
    cards = {p.name for p in CARDS.glob("*.md")} - OTHER_CARDS
    assert cards == set(FIXTURE_OF)


@pytest.mark.parametrize("name", sorted(FIXTURE_OF))
def test_card_snippet_loads_its_fixture(name, tmp_path):
    fixture, unpaired, layout = FIXTURE_OF[name]
    fields = snippet(CARDS / name)
    DataConfig(**fields)  # the snippet as published is a valid section
    config = DataConfig(**{**fields, "train": str(FIXTURES / fixture), "cache_dir": str(tmp_path)})
    prepared = prepare_data(config, build_word_tokenizer(), unpaired=unpaired, seed=0, log=lambda _: None,
                            completions=layout == "demonstrations")  # demonstrations are read for SFT only
    assert prepared.layout == layout
    assert len(prepared.train) + len(prepared.eval) == len((FIXTURES / fixture).read_text().splitlines())


def test_quickstart_card_snippet_loads_the_bundled_data(tmp_path, monkeypatch):
    card = CARDS / "quickstart-arithmetic.md"
    from dpo.quickstart import build_tokenizer

    monkeypatch.chdir(ROOT)  # the snippet's paths are relative to the repository root
    config = DataConfig(**{**snippet(card), "max_rows": 40, "cache_dir": str(tmp_path)})
    prepared = prepare_data(config, build_tokenizer(), unpaired=False, seed=0, log=lambda _: None)
    assert prepared.layout == "explicit"
    assert (len(prepared.train), len(prepared.eval)) == (40, 40)


def test_gold_scorer_card_names_a_scorer_that_scores_its_examples():
    import json

    from dpo.reward import load_gold

    card = (CARDS / "quickstart-gold.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", card, flags=re.S)
    spec = yaml.safe_load(blocks[-1])["online"]["gold"]
    scorer = load_gold(spec)
    examples = [json.loads(line) for block in re.findall(r"```json\n(.*?)```", card, flags=re.S)
                for line in block.splitlines()]
    assert examples and all(scorer(e["prompt"], e["completion"]) == e["gold"] for e in examples)
