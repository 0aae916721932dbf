"""The reference cache key holds the quantization settings: a 4-bit reference is never served to another."""

from __future__ import annotations

import pytest

from dpo.recipe import load_recipe
from tests.helpers import qlora_recipe

pytest.importorskip("bitsandbytes")


def test_reference_cache_misses_when_the_quantization_changes(tmp_path):
    from dpo.reference.setup import precompute_references

    recipe_path = qlora_recipe(tmp_path)
    messages: list[str] = []
    nf4 = precompute_references(load_recipe(recipe_path), log=messages.append)
    assert nf4 and all(path.is_file() for path in nf4.values())
    assert any("wrote" in m for m in messages)

    messages.clear()
    assert precompute_references(load_recipe(recipe_path), log=messages.append) == nf4  # same settings: a hit
    assert any("hit" in m for m in messages) and not any("wrote" in m for m in messages)

    seen = {split: {path} for split, path in nf4.items()}
    for override in (["model.quantization.quant_type=fp4"], ["model.quantization.double_quant=false"],
                     ["model.quantization.bits=8"], ["model.quantization=null", "model.dtype=float32"]):
        messages.clear()
        paths = precompute_references(load_recipe(recipe_path, override), log=messages.append)
        assert any("miss" in m for m in messages) and any("wrote" in m for m in messages), override
        for split, path in paths.items():
            assert path not in seen[split], override
            seen[split].add(path)
