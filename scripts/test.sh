#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# Two worker processes (pytest-xdist), each test file on one of them, so that a file's module fixtures (a trained
# reward model, the online pipeline) are built once. Tests run torch on one thread each (tests/conftest.py), so two
# workers keep two cores busy. DPO_TEST_WORKERS=0 runs everything in this process.
workers=${DPO_TEST_WORKERS:-2}
if [ "$workers" = 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
exec .venv/bin/python -m pytest -q -n "$workers" --dist loadfile "$@"
