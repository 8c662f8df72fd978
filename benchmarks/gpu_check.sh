#!/usr/bin/env bash
# The GPU check, in one short call (under 8 minutes on an H100): the CUDA tests, then the training throughput of
# the presets (bf16, RankDiff against the bare PyTorch loop, with MFU) and the sampling benchmark, then one table.
#
#   bash benchmarks/gpu_wheels.sh      # here, once: wheels of what the GPU machine lacks, into .whl/
#   bash benchmarks/gpu_check.sh       # there (with .whl carried); results under $OUT or benchmarks/results/gpu/
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/rankdiff-inductor
results=${OUT:-benchmarks/results/gpu}
mkdir -p "$results"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$results/gpu.txt"
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'accelerate', accelerate.__version__)" | tee -a "$results/gpu.txt"

timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_fast_path.py tests/test_modeling.py 2>&1 \
  | tail -n 15 | tee "$results/cuda_tests.txt"
timeout 240 python3 benchmarks/train_throughput.py --device cuda --bf16 --presets small base large \
  --batch_size 32 --steps 10 --warmup 3 --repeats 1 --output "$results/train_throughput.json" \
  2> "$results/train_throughput.log" | tee "$results/train_throughput.md"
timeout 120 python3 benchmarks/sampling.py --device cuda --preset base --cells 8 --steps 16 64 256 \
  --output "$results/sampling.json" 2> "$results/sampling.log" | tee "$results/sampling.md"
timeout 60 python3 benchmarks/sampling.py --device cuda --overhead --output "$results/sampling_overhead.json" \
  2>> "$results/sampling.log" | tee -a "$results/sampling.md"
# Every step after the first under torch.cuda.set_sync_debug_mode("error"): prints any host sync left in the loop
# (the syncs outside it are listed in the script's docstring).
timeout 90 python3 benchmarks/sync_check.py --preset base --cells 16 2>&1 | tee "$results/sync_check.txt"
echo
echo "== summary =="
cat "$results/gpu.txt"
grep -E "passed|failed|error" "$results/cuda_tests.txt" | tail -n 1
cat "$results/train_throughput.md" "$results/sampling.md" "$results/sync_check.txt"
