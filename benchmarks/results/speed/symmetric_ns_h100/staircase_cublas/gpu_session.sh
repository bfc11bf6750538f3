#!/usr/bin/env bash
# Session 24, one GPU call: symmetric products in Newton-Schulz and DeltaMomentum's G^T G.
# 1. GPU tests of the new paths; 2. NS accuracy + block sweep; 3. speed suite, tree before vs this tree.
set -u
OUT=${OUT:-./runs/out24}; mkdir -p "$OUT"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/session.log"
echo "[$(date +%T)] tests" | tee -a "$OUT/session.log"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_gpu.py -k "symmetric or newton_schulz or gram or muon or m3 or delta" \
  > "$OUT/tests.log" 2>&1; tail -3 "$OUT/tests.log" | tee -a "$OUT/session.log"
echo "[$(date +%T)] ns_accuracy" | tee -a "$OUT/session.log"
timeout 200 python3 -m benchmarks.ns_accuracy --device cuda --shapes 2048x2048,8192x2048,2048x8192 --batch 24 \
  --blocks 1,2,3,4,6,8 > "$OUT/ns_accuracy.txt" 2>&1; tail -40 "$OUT/ns_accuracy.txt"
echo "[$(date +%T)] speed" | tee -a "$OUT/session.log"
TREES="runs/before ." ROUNDS=1 OUT="$OUT/speed_trees" \
  OPTIMIZERS="'AdamW(fused)' Muon MuonMemory M3 DeltaMomentum" bash benchmarks/speed_trees.sh 2>&1 | tail -15
echo "[$(date +%T)] done" | tee -a "$OUT/session.log"
