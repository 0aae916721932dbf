#!/usr/bin/env bash
# Create .venv and install dpo-train with its test tools, at the library versions of
# scripts/constraints.txt (the ones the test suite last passed with). Idempotent: a second run with an
# unchanged pyproject.toml and constraints file only checks that the packages import.
#
#   TORCH_SPEC   torch requirement to install first (default torch==2.13.0). On a machine without a GPU this
#                must resolve to a CPU build; point pip at a CPU wheel or index (PIP_FIND_LINKS / PIP_INDEX_URL)
#                if your index would otherwise serve the CUDA build.
#   PYTHON       interpreter used to create the venv (default python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python_bin=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
stamp=.venv/.dpo-train-setup

[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
constraints=scripts/constraints.txt
want="$(cat pyproject.toml "$constraints" | sha256sum | cut -d' ' -f1) $torch_spec"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
    && .venv/bin/python -c "import torch, transformers, peft, datasets, accelerate, typer, dpo" 2>/dev/null; then
  echo "setup: .venv is up to date"
  exit 0
fi

.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned, so that nothing later pulls a different (multi-GB CUDA) build.
.venv/bin/python -m pip install --quiet "$torch_spec"
# Every other library at its tested version: a newer release never changes results behind the README's back.
.venv/bin/python -m pip install --quiet -c "$constraints" -e ".[test]"
.venv/bin/python - <<'PY'
import torch
gpu = torch.cuda.is_available()
print(f"setup: torch {torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU build'}), "
      f"GPU {'available' if gpu else 'not available'}")
PY
echo "$want" > "$stamp"
