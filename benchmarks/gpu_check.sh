#!/usr/bin/env bash
# The GPU checks as one short script for a lent GPU machine (~9 minutes): the CUDA kernel tests,
# then the GPU benchmarks (per-target overhead, delta path, training step), which write their JSON
# (and this script a log) into $OUT (or the first argument). Run from the repository root with a CUDA build of torch
# and transformers installed:
#
#     bash benchmarks/gpu_check.sh "$OUT"
#
# Each step has its own time limit, so one slow step cannot eat the others' budget; afterwards,
# on the development machine: copy the JSON into benchmarks/results/ and run benchmarks/plot.py.
set -uo pipefail
out=${1:-${OUT:-benchmarks/results}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's gpart, no install needed
export GPART_BENCH_RESULTS="$out"  # the benchmarks write their JSON there
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee "$out/gpu_check.log"
timeout 150 python -m pytest -q -p no:cacheprovider --continue-on-collection-errors tests -k cuda 2>&1 | tail -15 | tee -a "$out/gpu_check.log"
timeout 90 python benchmarks/bench_overhead.py --device cuda --widths 64 1024 --targets 32 128 \
    --rounds 3 --out overhead_cuda 2>&1 | tee -a "$out/gpu_check.log"
timeout 150 python benchmarks/bench_partition.py --targets 28 --shape 4096 4096 --d 131072 \
    --device cuda --repeats 5 --profile --out partition_cuda 2>&1 | tee -a "$out/gpu_check.log"
timeout 200 python benchmarks/bench_step.py --configs qwen2-0.5b --dtype bfloat16 --device cuda \
    --rounds 2 --steps 10 --warmup 3 --out step_cuda 2>&1 | tee -a "$out/gpu_check.log"
echo "done: results in $out"
