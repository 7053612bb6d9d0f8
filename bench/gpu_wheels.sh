#!/usr/bin/env bash
# Wheels for the lent GPU machine, which has no network: what bench/gpu.sh needs beyond its image
# (python 3.12 with torch, triton, transformers, accelerate, einops, jaxtyping, pyarrow, ...).
# Run here, then name .whl in the device tool's carry; gpu.sh's setup step installs them.
# TransformerLens 4.3 and the packages its import needs that the image lacks (checked by importing
# transformer_lens.patching and its TransformerBridge with only these added, on transformers 5.17).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl transformer-lens==4.3.0 beartype==0.23.1 fancy-einsum==0.0.3 typeguard==4.6.1 \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
du -sh .whl && ls .whl
