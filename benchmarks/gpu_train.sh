#!/usr/bin/env bash
# GPU training benchmarks (run from anywhere; needs a CUDA machine with the project's venv).
#
#   benchmarks/gpu_train.sh            # 1 GPU: bench_train (bf16 + fp32, loader wait, GPU util, embed)
#   NGPU=2 benchmarks/gpu_train.sh     # also: `copdssl train` under torchrun on NGPU GPUs (DDP, NCCL)
#
# Results: benchmarks/out/train.json (1 GPU) and benchmarks/out/ddp/history.tsv (pairs_per_s per epoch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
NGPU=${NGPU:-1}
STEPS=${STEPS:-50}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# 1) single GPU: full training steps at 32^3, batch 128, 4 loader threads; CPU rows for comparison
"$PY" -m benchmarks.bench_train --device auto --patch-size 32 --steps "$STEPS" --batch-size 128 --workers 4

# 2) DDP: the real stage under torchrun. batch_size is the GLOBAL batch (split across processes).
#    Note the `--` after `-m pipeline`: without it torchrun's own argument parser takes `--run`
#    for an abbreviation of its `--run-path` option and stops.
if [ "$NGPU" -gt 1 ]; then
  WORK=$(mktemp -d)/work
  "$PY" -m benchmarks.bench_train --make-work "$WORK" --subjects 512 --locations 64 --patch-size 32
  SETTINGS='{"seed": 0, "device": "cuda", "epochs": 2, "steps_per_epoch": '"$STEPS"', "batch_size": 256,
             "sampler": "location", "num_workers": 4, "amp": true,
             "moco": {"queue": "per_location", "queue_size": 4096}}'
  SETTINGS=$("$PY" -c "import json, sys; from pipeline.config import run_settings, validate_config; \
    print(json.dumps(run_settings(validate_config({'train': json.loads(sys.argv[1]), 'runs': {'bench': {}}}), 'bench')))" "$SETTINGS")
  "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" -m pipeline -- \
      train --run bench --subjects "$WORK/subjects.tsv" --work "$WORK" --settings "$SETTINGS"
  mkdir -p benchmarks/out/ddp
  cp "$WORK/runs/bench/history.tsv" benchmarks/out/ddp/history.tsv
  echo "DDP on $NGPU GPUs (global batch 256):"
  cat benchmarks/out/ddp/history.tsv
fi
