#!/usr/bin/env bash
# Session 24: the GPU tests of the symmetric-product kernel and the NS/delta paths on it (two autotuner configs).
OUT=${OUT:-./runs/out24d}; mkdir -p "$OUT"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_ns_symmetric.py tests/kernels/test_gpu.py \
  -k "symmetric or newton_schulz or gram or muon or m3 or delta or kernel_equals_baddbmm or mirrors or iterations or rounding" \
  --durations=5 > "$OUT/tests.log" 2>&1; tail -12 "$OUT/tests.log"
