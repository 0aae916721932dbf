"""Model loading: heads the log-prob kernels would get wrong are refused, clear errors, the tokenizer's pad."""

from __future__ import annotations

import pytest
import torch

from dpo.model import ModelError, check_head, load_base_model, load_tokenizer
from dpo.recipe import ModelConfig
from tests.helpers import build_tiny_model


def test_head_with_bias_is_refused(tmp_path):
    model = load_base_model(ModelConfig(path=str(build_tiny_model(tmp_path / "m"))))
    head = model.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
    with pytest.raises(ModelError, match="bias"):
        check_head(model)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="model.path"):
        load_base_model(ModelConfig(path=str(tmp_path / "absent")))


def test_tokenizer_without_pad_falls_back_to_eos(tmp_path):
    path = build_tiny_model(tmp_path / "m")
    tokenizer = load_tokenizer(ModelConfig(path=str(path)))
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 2
