"""GGUF checkpoints (``model.gguf_file``): read into the same dense network, with their tokenizer; clear errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import dpo.model.load as model_load
from dpo.model import ModelError, load_base_model, load_tokenizer, sequence_logprobs
from dpo.model.logprobs import LogprobSettings
from dpo.recipe import ModelConfig
from tests.helpers import GGUF_CHAT_TEMPLATE, build_tiny_gguf

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    build_tiny_gguf(root / "model", "tiny.gguf", source=root / "source")
    return root


def test_a_gguf_checkpoint_loads_as_the_dense_network_it_holds_with_its_tokenizer(gguf_model, tmp_path):
    config = ModelConfig(path=str(gguf_model / "model"), gguf_file="tiny.gguf")
    model = load_base_model(config, device="cpu")
    source = load_base_model(ModelConfig(path=str(gguf_model / "source")), device="cpu")
    assert list(model.state_dict()) == list(source.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert not getattr(model, "is_quantized", False) and getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path / "saved")  # a dense model saves like any other
    assert (tmp_path / "saved" / "model.safetensors").is_file()

    tokenizer = load_tokenizer(config)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)
    assert tokenizer.chat_template == GGUF_CHAT_TEMPLATE
    ids = tokenizer("Parity of 12: odd")["input_ids"]
    assert ids[0] == 1 and tokenizer.decode(ids[1:]) == "Parity of 12: odd"
    batch = torch.tensor([ids])
    sums = [sequence_logprobs(m, batch, torch.ones_like(batch), batch.clone(), LogprobSettings())[0]
            for m in (model, source)]
    assert torch.equal(sums[0], sums[1])


def test_bfloat16_dequantizes_into_bfloat16(gguf_model):
    model = load_base_model(ModelConfig(path=str(gguf_model / "model"), gguf_file="tiny.gguf", dtype="bfloat16"))
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


def test_a_missing_gguf_file_lists_the_gguf_files_that_are_there(gguf_model):
    config = ModelConfig(path=str(gguf_model / "model"), gguf_file="other.gguf")
    with pytest.raises(ModelError, match=r"model.gguf_file: other.gguf is not a file in .*the GGUF files there: tiny.gguf"):
        load_tokenizer(config)
    with pytest.raises(ModelError, match="model.gguf_file: other.gguf is not a file"):
        load_base_model(config)
    with pytest.raises(ModelError, match="it holds no .gguf file"):
        load_base_model(ModelConfig(path=str(gguf_model / "source"), gguf_file="tiny.gguf"),
                        keys=("reference.model_path", "reference.gguf_file"))


def test_without_the_gguf_package_the_error_says_what_to_install(gguf_model, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(model_load.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    config = ModelConfig(path=str(gguf_model / "model"), gguf_file="tiny.gguf")
    for load in (load_tokenizer, load_base_model):
        with pytest.raises(ModelError, match=r"model.gguf_file: reading a GGUF checkpoint needs the gguf package: "
                                             r"pip install 'dpo-train\[gguf\]'"):
            load(config)
