#!/usr/bin/env bash
# Download, here, the wheels that the GPU machine lacks into .whl/ (ignored by git), for bench/gpu_suite.sh.
#
# The GPU machine has PyTorch, Triton, transformers, peft and accelerate but not pydantic (the recipe), datasets
# (data preparation), bitsandbytes (the QLoRA table) or TRL (the comparison), and cannot reach a package index.
# These are the versions scripts/constraints.txt pins (TRL: the version the performance anchors used), as
# CPython 3.12 x86-64 wheels. About 46 MB.
#
#   bash bench/gpu_wheels.sh            # then carry .whl with the tree and run: bash bench/gpu_suite.sh OUT
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
pin() {  # the version scripts/constraints.txt pins for $1
  grep -i "^$1==" scripts/constraints.txt | head -1
}
packages=(
  "$(pin pydantic)" "$(pin pydantic_core)" "$(pin annotated-types)" "$(pin typing-inspection)"
  "$(pin datasets)" "$(pin dill)" "$(pin multiprocess)" "$(pin bitsandbytes)" "trl==${TRL_VERSION:-1.16.0}"
)
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
mkdir -p .whl
for package in "${packages[@]}"; do
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -q -d .whl "$package"
done
ls -l .whl
du -sh .whl
