#!/usr/bin/env bash
# The prepared GPU check for lungseg (issue 9), for a lent GPU machine (the `device` tool).
# It is not run by CI. Priorities, each step writing to $OUT as it finishes so that a
# time-out still returns what was done:
#   1. the benchmark on the GPU path: paper preset, 128 x 128, batch 256, bf16, channels_last;
#   2. the same with torch.compile;
#   3. a short paper-preset training of one fold on phantoms (a few epochs).
# Packages that the GPU image lacks (monai, fastcore, SimpleITK) travel as wheels in .whl/
# (see the device tool's README: `pip download --only-binary=:all: --python-version 3.12 ...`).
# Call:  run(command="bash tests/gpu/run_gpu_bench.sh", carry=[".whl"], timeout_s=560)
set -u
OUT=${OUT:-/tmp/lungseg_gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
timeout 300 python3 -m lungseg.bench --gpu --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
timeout 120 python3 -m lungseg.bench --gpu --compile --models unet proposed --out "$OUT/bench_gpu_compile.json" 2>&1 | tee "$OUT/bench_gpu_compile.log"
timeout 120 python3 -m lungseg.cli train --model proposed --preset paper --epochs 3 --device cuda --out "$OUT/train_paper" 2>&1 | tail -40 | tee "$OUT/train_paper.log"
echo "done"
