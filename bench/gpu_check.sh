#!/usr/bin/env bash
# One prepared run for a GPU machine (H100/H200), 8 minutes or more:
#   bash bench/gpu_check.sh OUT_DIR
# The steps' own limits add up to more than one device call's 10 minutes: run it under an
# outer `timeout` and pack OUT_DIR afterwards (docs/benchmarks.md); a cut-off run loses only
# the last, least important steps.
# CUDA tests, the model benchmark in bfloat16 compiled (CUDA graphs) and eager (with the seed's
# algorithm as baseline), the same compiled with dynamic rows (and its warm-up time), the
# decode-step time, images/s through the handler's batched path, a
# profile of the compiled decode loop and steps, the handler's warm-up time (every graph a
# default batch can need), the handler's CUDA tests, and peak GPU memory; most
# important first, so a cut-off run still leaves the main figures. Everything is written under
# OUT_DIR. Needs python3 with torch + transformers + pillow + pyyaml + pytest (the GPU box's
# image has them) and the `ts` package on PYTHONPATH. CAPTION_SHARED must point at a copy of
# shared/ (fixtures/seed-tiny).
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
CKPT=${CKPT:-/tmp/random-init-weights.pt}
step() { echo "=== $* ($(date +%T))" | tee -a "$OUT/summary.txt"; }

step versions
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/summary.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/summary.txt"

step cuda tests
timeout 150 $PY -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log" | tail -5 | tee -a "$OUT/summary.txt"

step random full-size checkpoint
[ -f "$CKPT" ] || $PY -m weights random --output "$CKPT" 2>&1 | tail -1

step model benchmark, bf16 compiled
timeout 200 $PY -m bench model --weights "$CKPT" --device cuda --dtype bfloat16 --compile --batch-sizes 1,8,64,128 \
  --step-rows 8,64 --max-new-tokens 64 --no-baseline --out "$OUT" 2>&1 | tee "$OUT/bench-compiled.log" | tail -14 | tee -a "$OUT/summary.txt"

step "model benchmark, bf16 compiled with dynamic rows: one compilation per span for all row buckets"
timeout 200 $PY -m bench model --weights "$CKPT" --device cuda --dtype bfloat16 --compile --dynamic-rows \
  --batch-sizes 1,8,64,128 --step-rows 8,64 --max-new-tokens 64 --no-baseline --out "$OUT" 2>&1 \
  | tee "$OUT/bench-compiled-dynamic.log" | tail -9 | tee -a "$OUT/summary.txt"

step handler warm-up with the default settings and dynamic rows, then batches of 8 default requests
mkdir -p "$OUT/warmup-dynamic"
timeout 240 $PY -m bench handler --weights "$CKPT" --device cuda --compile --dynamic-rows --warmup --batch-size 8 \
  --batches 3 --max-new-tokens 128 --out "$OUT/warmup-dynamic" 2>&1 | tee "$OUT/bench-handler-warmup-dynamic.log" \
  | tail -4 | tee -a "$OUT/summary.txt"

step handler batched path, compiled, 64 requests per batch
timeout 90 $PY -m bench handler --weights "$CKPT" --device cuda --compile --batch-size 64 --batches 3 \
  --decode-threads 16 --max-new-tokens 64 --out "$OUT" 2>&1 | tee "$OUT/bench-handler.log" | tail -3 | tee -a "$OUT/summary.txt"

step profile of the compiled decode loop, 64 images, and of the 8-, 64- and 384-row steps
timeout 90 $PY -m bench.profile_gpu "$CKPT" 64 8,64,384 > "$OUT/profile.txt" 2>&1; grep -A12 "row decode step" "$OUT/profile.txt" | cut -c1-160 | tee -a "$OUT/summary.txt"

step handler warm-up with the default settings, then batches of 8 default requests
mkdir -p "$OUT/warmup"
timeout 240 $PY -m bench handler --weights "$CKPT" --device cuda --compile --warmup --batch-size 8 --batches 3 \
  --max-new-tokens 128 --out "$OUT/warmup" 2>&1 | tee "$OUT/bench-handler-warmup.log" | tail -4 | tee -a "$OUT/summary.txt"

step model benchmark, bf16 eager, with the seed-algorithm baseline
timeout 80 $PY -m bench model --weights "$CKPT" --device cuda --dtype bfloat16 --batch-sizes 1,8,64 \
  --step-rows 6,64 --max-new-tokens 64 --out "$OUT" 2>&1 | tee "$OUT/bench-eager.log" | tail -12 | tee -a "$OUT/summary.txt"

step handler CUDA tests: golden captions, bf16 default, out-of-memory recovery, full-size batch, compiled by default
timeout 240 $PY -m pytest -q -m gpu tests/integration/test_handler.py -p no:cacheprovider 2>&1 | tee "$OUT/handler-gpu-tests.log" | tail -5 | tee -a "$OUT/summary.txt"
step done
