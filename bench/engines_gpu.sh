#!/usr/bin/env bash
# The multi-GPU checks, ready for a machine with CUDA GPUs (run from the repository root, after setup).
#
# With two or more GPUs: the engine tests (DDP, FSDP2, FSDP2 over a 4-bit base, DeepSpeed ZeRO-2/3, two
# simulated machines) on CUDA with NCCL instead of CPU processes with gloo; each compares two processes with
# one process accumulating the same micro-batches.
# With one GPU: each example accelerate config's one-process path on the quickstart task.
# Always: the per-GPU memory estimates of bench/engines.py, to put beside what the runs report.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
echo "CUDA GPUs: $GPUS"
if [ "$GPUS" -ge 2 ]; then
  CUDA_VISIBLE_DEVICES=0,1 "$PY" -m pytest tests/train/test_engine.py -q -rA
fi
if [ "$GPUS" -ge 1 ]; then
  for config in ddp fsdp2 fsdp2-qlora deepspeed-zero2 deepspeed-zero3; do
    echo "== $config, one process"
    CUDA_VISIBLE_DEVICES=0 "$PY" -m accelerate.commands.launch --config_file "recipes/accelerate/$config.yaml" \
      --num_processes 1 -m dpo.cli recipes/quickstart.yaml --set "output.dir=runs/gpu-$config" \
      --set train.max_steps=20 --overwrite
  done
fi
"$PY" bench/engines.py
