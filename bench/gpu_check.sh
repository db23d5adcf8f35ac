#!/usr/bin/env bash
# One prepared run for a GPU machine (H100/H200):
#   bash bench/gpu_check.sh OUT_DIR [STEP ... | all]
# By default the speed issue's check, in under 8 minutes: tests, compiled, eager (CUDA parity
# tests; the bf16 model benchmark compiled and eager, with the seed's algorithm as baseline;
# decode-step times; peak GPU memory). `all` runs every step below, most important first
# (together far more than one device call's 10 minutes: give a selection, or a larger budget).
# BUDGET_S (default 470) bounds the whole run: each step's time limit is cut to what is left of
# it, and a step that would get under 20 s is skipped (the summary says so).
#   tests           CUDA tests (parity, compiled = eager, spans, dynamic rows, image-major, bf16) ~2.5 min
#   layout-ab       model benchmark, batch 64, 64- and 384-row steps (dynamic rows): static
#                   layout rows, then images (each image's prefix stored once)      ~4 min
#   handler-images  the handler step with static_layout images                           ~2.5 min
#   compiled        model benchmark, bf16, compiled (CUDA graphs), decode-step times      ~3 min
#   dynamic         the same with dynamic rows (one compilation per span)                ~3 min
#   rows-ab         model benchmark, batch 64 and the 64-row step: dynamic rows, then static ~2 min
#   warmup-dynamic  the handler's own warm-up, default settings (dynamic rows); batch 8    ~2.5 min
#   handler         images/s through the handler's batched path, 64 requests per batch    ~2 min
#                   (defaults: decode processes on a GPU; its first batch compiles: with
#                   dynamic rows more than 90 s, run 6)
#   threads         the same with the 16 decode threads instead (the A/B for the default)   ~1 min
#   photos          the handler with 12 MP camera-sized JPEGs (4032x3024), jpeg_draft off then on ~2.5 min
#   handler-before  the same with run 4's settings (decode threads with all cores' intra-op
#                   threads, eager prefill, static rows): the A/B in one lease            ~1.5 min
#   images-processes the handler step with both candidates not yet measured on a GPU: static
#                   layout images and 15 decode processes (the configuration for >= 300/s) ~2.5 min
#   processes       the handler step with 15 decode processes instead of 16 threads         ~2 min
#   raw             the handler step with raw-body requests (no base64), as `curl -T` sends ~2 min
#   workers         two handler processes on the GPU, 64 requests per batch, timed together ~2 min
#                   (7 decode processes each: half the cores less one)
#   handler-128     one handler, 128 requests per batch                                     ~2 min
#   profile         profile of a 64-image batch and of the 8-, 64- and 384-row steps      ~1 min
#   profile-images  the same with static_layout images                                  ~1.5 min
#   warmup          the same with static rows (> 190 s on an H100)                        > 3 min
#   eager           model benchmark, bf16, eager, with the seed's algorithm as baseline   ~0.5 min
#   handler-tests   the handler's CUDA tests (golden captions, bf16, out of memory, ...)  ?
# Each writes under OUT_DIR, with the figures in OUT_DIR/summary.txt. Needs python3 with torch
# + transformers + pillow + pyyaml + pytest (the GPU box's image has them) and the `ts`
# package on PYTHONPATH. CAPTION_SHARED must point at a copy of shared/ (fixtures/seed-tiny).
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUT_DIR [STEP ...]}
shift
ALL_STEPS="tests layout-ab handler threads photos handler-images images-processes processes raw compiled dynamic rows-ab warmup-dynamic
handler-before workers handler-128 profile profile-images warmup eager handler-tests"
STEPS=${*:-tests compiled eager}
[ "$STEPS" = all ] && STEPS=$ALL_STEPS
BUDGET_S=${BUDGET_S:-470}
# A step's time limit: its own, or what is left of the budget if that is less (at least 1 s:
# `timeout 0` would mean no limit at all).
limit() { local left=$((BUDGET_S - SECONDS)); left=$(( left < 1 ? 1 : left )); echo $(( left < $1 ? left : $1 )); }
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
CKPT=${CKPT:-/tmp/random-init-weights.pt}
summary() { tee -a "$OUT/summary.txt"; }
COMPILED=(--weights "$CKPT" --device cuda --dtype bfloat16 --compile --batch-sizes 1,8,64,128 --step-rows 8,64
          --max-new-tokens 64 --no-baseline --out "$OUT")
WARMUP=(--weights "$CKPT" --device cuda --compile --warmup --batch-size 8 --batches 3 --max-new-tokens 128)

run_tests() {
  timeout $(limit 240) $PY -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log" | tail -5 | summary
}
run_compiled() {
  timeout $(limit 200) $PY -m bench model "${COMPILED[@]}" 2>&1 | tee "$OUT/bench-compiled.log" | tail -14 | summary
}
run_dynamic() {
  timeout $(limit 200) $PY -m bench model "${COMPILED[@]}" --dynamic-rows 2>&1 | tee "$OUT/bench-compiled-dynamic.log" \
    | tail -9 | summary
}
run_rows-ab() {
  for rows in dynamic static; do
    mkdir -p "$OUT/rows-$rows"
    flag=$([ $rows = dynamic ] && echo --dynamic-rows)
    timeout $(limit 150) $PY -m bench model --weights "$CKPT" --device cuda --dtype bfloat16 --compile --batch-sizes 64 \
      --step-rows 64 --max-new-tokens 64 --no-baseline $flag --out "$OUT/rows-$rows" 2>&1 \
      | tee "$OUT/bench-rows-$rows.log" | grep -E "^batch|^decode step" | sed "s/^/$rows: /" | summary
  done
}
run_layout-ab() {
  for layout in rows images; do
    mkdir -p "$OUT/layout-$layout"
    timeout $(limit 180) $PY -m bench model --weights "$CKPT" --device cuda --dtype bfloat16 --compile --dynamic-rows \
      --static-layout $layout --batch-sizes 64 --step-rows 64,384 --max-new-tokens 64 --no-baseline \
      --out "$OUT/layout-$layout" 2>&1 | tee "$OUT/bench-layout-$layout.log" \
      | grep -E "^batch|^decode step|^peak" | sed "s/^/$layout: /" | summary
  done
}
run_warmup-dynamic() {
  mkdir -p "$OUT/warmup-dynamic"
  timeout $(limit 300) $PY -m bench handler "${WARMUP[@]}" --dynamic-rows --out "$OUT/warmup-dynamic" 2>&1 \
    | tee "$OUT/bench-handler-warmup-dynamic.log" | tail -4 | summary
}
HANDLER=(--weights "$CKPT" --device cuda --compile --batches 3 --decode-threads 16 --max-new-tokens 64)
run_handler() {
  timeout $(limit 240) $PY -m bench handler "${HANDLER[@]}" --batch-size 64 --out "$OUT" 2>&1 | tee "$OUT/bench-handler.log" \
    | tail -3 | summary
}
run_threads() {
  timeout $(limit 240) $PY -m bench handler "${HANDLER[@]}" --batch-size 64 --decode-processes 0 --out "$OUT/threads" 2>&1 \
    | tee "$OUT/bench-handler-threads.log" | tail -3 | summary
}
run_photos() {
  for draft in no-jpeg-draft jpeg-draft; do
    timeout $(limit 150) $PY -m bench handler "${HANDLER[@]}" --batch-size 64 --photo-size 4032x3024 --$draft \
      --out "$OUT/photos-$draft" 2>&1 | tee "$OUT/bench-handler-photos-$draft.log" | tail -2 | sed "s/^/$draft: /" | summary
  done
}
run_handler-images() {
  timeout $(limit 240) $PY -m bench handler "${HANDLER[@]}" --batch-size 64 --static-layout images --out "$OUT/handler-images" \
    2>&1 | tee "$OUT/bench-handler-images.log" | tail -3 | summary
}
run_handler-before() {
  timeout $(limit 240) $PY -m bench handler "${HANDLER[@]}" --batch-size 64 --decode-intra-op-threads 0 --no-compile-prefill \
    --no-dynamic-rows --decode-processes 0 \
    --out "$OUT/handler-before" 2>&1 | tee "$OUT/bench-handler-before.log" | tail -3 | summary
}
run_images-processes() {
  timeout $(limit 240) $PY -m bench handler "${HANDLER[@]}" --batch-size 64 --static-layout images --decode-processes 15 \
    --out "$OUT/images-processes" 2>&1 | tee "$OUT/bench-handler-images-processes.log" | tail -3 | summary
}
run_processes() {
  timeout $(limit 240) $PY -m bench handler "${HANDLER[@]}" --batch-size 64 --decode-processes 15 --out "$OUT/processes" 2>&1 \
    | tee "$OUT/bench-handler-processes.log" | tail -3 | summary
}
run_raw() {
  timeout $(limit 240) $PY -m bench handler "${HANDLER[@]}" --batch-size 64 --request-form raw --out "$OUT/raw" 2>&1 \
    | tee "$OUT/bench-handler-raw.log" | tail -3 | summary
}
run_workers() {
  timeout $(limit 240) $PY -m bench handler "${HANDLER[@]}" --batch-size 64 --workers 2 --decode-processes 7 --out "$OUT" 2>&1 \
    | tee "$OUT/bench-handler-workers.log" | tail -2 | summary
}
run_handler-128() {
  timeout $(limit 240) $PY -m bench handler "${HANDLER[@]}" --batch-size 128 --out "$OUT/handler-128" 2>&1 \
    | tee "$OUT/bench-handler-128.log" | tail -3 | summary
}
run_profile() {
  timeout $(limit 90) $PY -m bench.profile_gpu "$CKPT" 64 8,64,384 > "$OUT/profile.txt" 2>&1
  grep -A12 "row decode step" "$OUT/profile.txt" | cut -c1-160 | summary
}
run_profile-images() {
  timeout $(limit 120) $PY -m bench.profile_gpu "$CKPT" 64 8,64,384 images > "$OUT/profile-images.txt" 2>&1
  grep -A12 "row decode step" "$OUT/profile-images.txt" | cut -c1-160 | summary
}
run_warmup() {
  mkdir -p "$OUT/warmup"
  timeout $(limit 300) $PY -m bench handler "${WARMUP[@]}" --no-dynamic-rows --out "$OUT/warmup" 2>&1 \
    | tee "$OUT/bench-handler-warmup.log" \
    | tail -4 | summary
}
run_eager() {
  timeout $(limit 80) $PY -m bench model --weights "$CKPT" --device cuda --dtype bfloat16 --batch-sizes 1,8,64 \
    --step-rows 6,64 --max-new-tokens 64 --out "$OUT" 2>&1 | tee "$OUT/bench-eager.log" | tail -12 | summary
}
run_handler-tests() {
  timeout $(limit 240) $PY -m pytest -q -m gpu tests/integration/test_handler.py -p no:cacheprovider 2>&1 \
    | tee "$OUT/handler-gpu-tests.log" | tail -5 | summary
}

echo "=== versions ($(date +%T))" | summary
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | summary
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | summary
[ -f "$CKPT" ] || $PY -m weights random --output "$CKPT" 2>&1 | tail -1
for name in $STEPS; do
  if ! declare -F "run_$name" > /dev/null; then
    echo "unknown step '$name'" | summary
    continue
  fi
  if [ $((BUDGET_S - SECONDS)) -lt 20 ]; then
    echo "=== $name skipped: ${SECONDS} s of the ${BUDGET_S}-s budget (BUDGET_S) spent" | summary
    continue
  fi
  echo "=== $name ($(date +%T))" | summary
  "run_$name"
done
echo "=== done ($(date +%T))" | summary
