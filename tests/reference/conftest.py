"""Fixtures shared by the reference tests."""

from __future__ import annotations

import pytest

from tests.helpers import build_tiny_model, write_pairs


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """One tiny Llama and one small pair set shared by the tests that do not modify them."""
    root = tmp_path_factory.mktemp("reference-assets")
    model = build_tiny_model(root / "model")
    train, eval_ = write_pairs(root / "data", train=24, eval=12)
    return {"model": model, "train": train, "eval": eval_, "root": root}
