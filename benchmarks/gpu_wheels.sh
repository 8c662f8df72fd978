#!/usr/bin/env bash
# Download, here (where pip reaches the registry), the wheels benchmarks/gpu_check.sh needs on a GPU machine that has
# only torch, transformers, accelerate, numpy, pandas, scipy, h5py, matplotlib and pytest: into .whl/ (git-ignored
# through .git/info/exclude), for CPython 3.12 on x86-64 Linux.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  diffusers==0.42.1 datasets==5.2.0 evaluate==0.4.6 dill==0.4.0 multiprocess==0.70.19 \
  anndata==0.12.19 array-api-compat legacy-api-wrap natsort scverse-misc zarr==3.1.6 donfig numcodecs google-crc32c
ls -la .whl
