#!/usr/bin/env bash
# Session 25, one short call: the GPU tests of the NaN/Inf check kernel, the check against torch's form alone and inside
# the steps of the optimizers that run it (ratios to torch's fused optimizers), then torch.compile(opt.step) on CUDA.
set -u
OUT=${OUT:-./runs/out25}; mkdir -p "$OUT"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/session.log"
echo "[$(date +%T)] check tests" | tee -a "$OUT/session.log"
timeout 45 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_nonfinite_check.py > "$OUT/tests_check.log" 2>&1
tail -3 "$OUT/tests_check.log" | tee -a "$OUT/session.log"
echo "[$(date +%T)] check" | tee -a "$OUT/session.log"
timeout 100 python3 -u -m benchmarks.nonfinite_check --rounds 2 --repeats 6 2>&1 | tee "$OUT/nonfinite_check.md"
echo "[$(date +%T)] compile tests" | tee -a "$OUT/session.log"
timeout 70 python3 -m pytest -q -p no:cacheprovider tests/deepopt/test_compile_cuda.py -m "not slow" --durations=3 \
  > "$OUT/tests_compile.log" 2>&1; tail -8 "$OUT/tests_compile.log" | tee -a "$OUT/session.log"
echo "[$(date +%T)] done" | tee -a "$OUT/session.log"
