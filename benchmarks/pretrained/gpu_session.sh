#!/usr/bin/env bash
# The pretrained memories on one GPU machine, in one call of under 10 minutes:
#   speed  first and alone: the speed suite's step time of every shipped memory's read-out beside fused AdamW
#          and DeepMomentum (python -m benchmarks run --suite speed --optimizers ...), into $OUT/speed
# then both at once (their small tasks are launch-bound, so processes share the GPU well):
#   suite  the `pretrained` suite on CUDA: the shipped memory (MEMORY, default `default`) against AdamW and
#          Muon on the held-out families, one process per family (python -m benchmarks.pretrained.evaluate
#          --device cuda --workers 5)
#   meta   meta-training at GPU scale: NPROC processes (default 8) on the GPU(s) under torchrun, each with
#          its own tasks, meta-gradients averaged every outer step (META_ARGS replaces the training
#          arguments); resumable: it stops at META_SECONDS and checkpoints into $OUT/meta, which the
#          next call continues when META_FROM names a folder holding an earlier call's meta/ (unpacked)
# Knobs: STEPS ("suite meta"; add "speed" for the step times), MEMORY, NPROC, META_ARGS, META_SECONDS (400), SUITE_SECONDS (480), META_FROM.
# Everything lands in $OUT (default ./runs/pretrained_gpu): session.log and pretrained_gpu.tgz (suite/, meta/,
# the logs): the device tool returns only a few files.
#
# Usage: OUT=/tmp/out bash benchmarks/pretrained/gpu_session.sh
set -u
out=${OUT:-./runs/pretrained_gpu}
mkdir -p "$out"
start=$(date +%s)
say() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$out/session.log"; }
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
steps=" ${STEPS:-suite meta} "
say "$(python3 -c "import torch; print('torch', torch.__version__, torch.cuda.device_count(), 'x', torch.cuda.get_device_name())")"
if [[ "$steps" == *" speed "* ]]; then
  memories=$(python3 -c "import deepopt; print(' '.join('DeepMomentum.pretrained' if n == 'default' else
    f'DeepMomentum.pretrained({n})' for n in deepopt.pretrained.available()))")
  say "speed start: $memories"
  # shellcheck disable=SC2086  # one optimizer name per word
  python3 -m benchmarks run --suite speed --device cuda --optimizers "AdamW(fused)" DeepMomentum $memories \
    --out "$out/speed" > "$out/speed.log" 2>&1
  tail -n 30 "$out/speed.log" | tee -a "$out/session.log"
fi
pids=""
if [[ "$steps" == *" suite "* ]]; then
  say "suite start (memory ${MEMORY:-default})"
  timeout "${SUITE_SECONDS:-480}" python3 -m benchmarks.pretrained.evaluate --device cuda --workers 5 \
    --memory "${MEMORY:-default}" --out "$out/suite" > "$out/suite.log" 2>&1 &
  pids="$pids $!"
fi
if [[ "$steps" == *" meta "* ]]; then
  [ -n "${META_FROM:-}" ] && cp -r "$META_FROM/meta" "$out/meta"
  say "meta start (${NPROC:-8} processes)"
  torchrun --standalone --nproc-per-node "${NPROC:-8}" -m benchmarks.pretrained.meta_train --device cuda \
    --out "$out/meta" --max-seconds "${META_SECONDS:-400}" \
    ${META_ARGS:---meta-steps 300 --unroll 60 --truncation 10 --tasks-per-step 2 --sigmas ns} \
    > "$out/meta.log" 2>&1 &
  pids="$pids $!"
fi
wait $pids
say "done"
tail -n 12 "$out/suite.log" 2>/dev/null | tee -a "$out/session.log"
grep -E "outer step|validation|out of time|chosen|Error" "$out/meta.log" 2>/dev/null | tail -n 8 | cut -c1-300 \
  | tee -a "$out/session.log"
tar czf "$out/pretrained_gpu.tgz" -C "$out" $(cd "$out" && ls -d speed suite meta speed.log suite.log meta.log 2>/dev/null)
rm -rf "${out:?}/speed" "${out:?}/suite" "${out:?}/meta"
