#!/usr/bin/env bash
# The GPU list (docs/gpu.md) as one prepared run, for a machine lent for minutes: every step under
# its own time limit, each step's log and results gathered into $OUT as they finish.
#
#   bash bench/gpu.sh [STEP ...]      steps: setup tests kernels scan patching dct (default: all)
#   GPU_SMOKE=1 bash bench/gpu.sh     the same steps at tiny sizes on a CPU: checks this script
#
# On the lent machine (its own image: python3 with torch, triton and transformers; no network),
# setup installs causalscan without dependencies, and any wheels carried in .whl/ (made by
# bench/gpu_wheels.sh: TransformerLens for the peer comparison). $OUT gets summary.txt (one line
# per step: name, exit status, seconds), log.txt (everything printed) and results.tar.gz (the
# bench JSONs and the GPU tests' junit XML, for bench/results/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
RES=$(mktemp -d)  # packed into $OUT/results.tar.gz after every step ($OUT brings back 8 files at most)
SITE=/tmp/causalscan-gpu-site  # what setup installs outside the image's environment
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
SMOKE=${GPU_SMOKE:-0}
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(setup tests kernels scan patching dct)

tag() {  # the device in file names: cuda-NVIDIA_H200, or cpu-smoke
  python3 - <<'EOF'
import torch
print("cuda-" + torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "cpu-smoke")
EOF
}

step_setup() {
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  fi
  python3 -c "import causalscan" 2>/dev/null \
    || python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" . || return 1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
for name in ("triton", "transformers", "accelerate", "numpy", "transformer_lens", "ray"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError:
        print(name, "not installed")
EOF
}

step_tests() {  # compiled kernels: never the interpreter (the GPU tests refuse it)
  TRITON_INTERPRET=0 python3 -m pytest -q -m gpu -p no:cacheprovider --junitxml="$RES/gpu-tests-$TAG.xml"
}

step_kernels() {
  if [ "$SMOKE" = 1 ]; then python3 bench/bench_kernels.py --check; return; fi
  python3 bench/bench_kernels.py --out "$RES/kernels-$TAG.json"
}

step_scan() {
  if [ "$SMOKE" = 1 ]; then
    python3 bench/bench_scan.py --sizes tiny --repeats 1 --variants plain,atp*-qk --out "$RES/scan-$TAG.json"
  else
    python3 bench/bench_scan.py --sizes 1b --repeats 3 --out "$RES/scan-$TAG-1b.json"
  fi
}

step_patching() {  # a GPT-2 shape and the real tier's shape (SmolLM2-135M, random weights)
  if [ "$SMOKE" = 1 ]; then
    python3 bench/bench_patching.py --models random:llama-tiny --repeats 1 --out "$RES"
  else
    python3 bench/bench_patching.py --models random:gpt2-small,random:llama-135m --repeats 3 --out "$RES"
  fi
}

step_dct() {  # 512 DCT vectors on a 7B shape, bf16 (the reference implementation: ~30 s on an H100)
  if [ "$SMOKE" = 1 ]; then
    python3 bench/bench_elicit.py --model random:llama-tiny --n 8 --dct-iters 2 --methods dct --repeats 1 \
      --out "$RES/elicit-$TAG.json"
  else
    python3 bench/bench_elicit.py --model random:llama-7b --dtype bfloat16 --n 512 --methods dct --repeats 1 \
      --out "$RES/elicit-$TAG-7b.json"
  fi
}

declare -A LIMIT=([setup]=90 [tests]=180 [kernels]=120 [scan]=180 [patching]=150 [dct]=180)
TAG=unknown
for s in "${STEPS[@]}"; do
  if [ -z "${LIMIT[$s]:-}" ]; then echo "unknown step $s; steps: ${!LIMIT[*]}" >&2; exit 2; fi
  [ "$s" != setup ] && [ "$TAG" = unknown ] && TAG=$(tag)
  echo "=== $s (limit ${LIMIT[$s]} s) $(date -u +%H:%M:%S)" | tee -a "$OUT/log.txt"
  t0=$(date +%s)
  # a step's own function under a time limit, in a subshell: a hung step costs its limit, no more
  export -f "step_$s"; export RES SITE TAG SMOKE
  timeout -k 10 "${LIMIT[$s]}" bash -c "step_$s" 2>&1 | tee -a "$OUT/log.txt"
  rc=${PIPESTATUS[0]}
  echo "$s rc=$rc $(( $(date +%s) - t0 ))s$([ "$rc" = 124 ] && echo ' (timed out)')" | tee -a "$OUT/summary.txt"
  tar -czf "$OUT/results.tar.gz" -C "$RES" . 2>/dev/null
done
cat "$OUT/summary.txt"
echo "results in $OUT"
