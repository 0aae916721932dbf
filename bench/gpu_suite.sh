#!/usr/bin/env bash
# One prepared run on a CUDA machine: the CUDA tests and every GPU benchmark, each table written to a file.
#
#   bash bench/gpu_suite.sh [OUT_DIR]          # default: $OUT if set, else gpu-results/
#
# Steps (each under its own time limit, so the whole run ends within 10 minutes on one H100 even if a step
# hangs; a step that fails or runs out of time is noted and the next one runs):
#   1. environment.txt  GPU, driver, library versions
#   2. cuda_tests.txt   pytest -m cuda (Triton log-prob kernels at vocabularies 32000..256000, packed batches
#                       through FlexAttention with gradients)
#   3. throughput.md    bench/throughput.py --shape 1b: padded, packed, packed + prefix-shared (and TRL)
#   4. logprob.md       bench/logprob.py: log-prob kernels against full logits, Liger and CCE when installed
#   5. reference.md     bench/reference.py --preset 1b: reference precompute speed, start to first step
#   6. memory.md        bench/memory.py: the QLoRA table (Llama-3-8B shape, 4-bit, peak memory vs the estimate)
# Packages the machine lacks travel as wheels in .whl/ (bash bench/gpu_wheels.sh, here); they are installed
# into /tmp/site first.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-${OUT:-gpu-results}}
mkdir -p "$out"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH="$PWD:/tmp/site"
fi
# Benchmark models are built here (random weights), never downloaded.
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-/tmp/dpo-bench-cache}
status=0
step() {  # step NAME SECONDS FILE COMMAND...: run with a time limit, output to FILE (and this log)
  local name=$1 seconds=$2 file=$3
  shift 3
  echo "== $name (at most ${seconds}s) -> $out/$file"
  local start=$SECONDS
  timeout --signal=INT --kill-after=10 "$seconds" "$@" 2>&1 | tee "$out/$file"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$out/$file"
  [ "$rc" -eq 0 ] || status=1
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$PY" - <<'PY'
import importlib, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("transformers", "peft", "accelerate", "triton", "datasets", "pydantic", "bitsandbytes", "trl",
             "liger_kernel", "cut_cross_entropy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:
        print(name, "not available:", type(exc).__name__)
PY
} 2>&1 | tee "$out/environment.txt"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "no CUDA device visible: nothing to measure" | tee -a "$out/environment.txt"; exit 1; }

step "CUDA tests" 90 cuda_tests.txt "$PY" -m pytest -q -m cuda -p no:cacheprovider \
  tests/kernels/test_triton_logprobs.py tests/model/test_packing.py
step "throughput, 1B" 210 throughput.md "$PY" bench/throughput.py --shape 1b --repeats 1 --pairs 64
step "log-prob kernels" 60 logprob.md "$PY" bench/logprob.py
step "reference precompute, 1B" 80 reference.md "$PY" bench/reference.py --preset 1b --pairs 2000 \
  --dtype bfloat16 --batch-size 64
step "QLoRA memory table" 120 memory.md "$PY" bench/memory.py --no-trl
echo "tables in $out: $(ls "$out" | tr '\n' ' ')"
exit $status
