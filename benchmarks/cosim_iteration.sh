#!/usr/bin/env bash
# Issue 8 targets on one GPU: the CoSIM iteration (task=bench) for each published architecture at the issue's batch,
# eager and compiled. Prints each result and collects the bench.json files under ${OUT:-bench-runs}/.
#   bash benchmarks/cosim_iteration.sh              # all targets
#   MODELS="edm2-s" bash benchmarks/cosim_iteration.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-runs}
MODELS=${MODELS:-"edm-in64:32 edm-cifar10-cond:64 edm2-s:32 edm2-l:32"}
for entry in $MODELS; do
    model=${entry%%:*}; batch=${entry##*:}
    [ "$batch" = "$model" ] && batch=32
    for compile in none default; do
        python launch.py task=bench model="$model" train.batch="$batch" train.batch_gpu="$batch" engine.backend=torch \
            engine.precision=bf16 teacher.precision=bf16 engine.compile="$compile" engine.channels_last=true \
            run.root="$OUT" run.name="$model-b$batch-$compile" logging.wandb=disabled
    done
done
