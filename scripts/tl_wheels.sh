#!/usr/bin/env bash
# The wheels that put TransformerLens 4.x on the offline GPU machine beside its own packages (Python 3.12,
# torch, transformers, pandas, pyarrow, einops, jaxtyping there already): into .wheels/tl, which
# `benchmarks/run_gpu.sh experiments` installs from (carry .wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform any -d .wheels/tl \
    transformer-lens==4.3.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls -l .wheels/tl
