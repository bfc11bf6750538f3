#!/usr/bin/env bash
# Session 24, last GPU call (lean): the symmetric-product Triton kernel against cuBLAS, its tests, NS accuracy
# and time at the speed suite's shapes, then the speed suite for Muon/MuonMemory/M3/DeltaMomentum (this tree).
set -u
OUT=${OUT:-./runs/out24c}; mkdir -p "$OUT"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/session.log"
echo "[$(date +%T)] kernel vs cuBLAS" | tee -a "$OUT/session.log"
timeout 90 python3 - <<'PY' 2>&1 | tee "$OUT/kernel.txt"
import torch
from benchmarks.speed import time_cuda
from deepopt.levels.orthogonal.symmetric import symmetric_baddbmm
from deepopt.levels.orthogonal import triton_kernels as tk
torch.manual_seed(0)
for (b, m, k, dt) in [(24, 2048, 2048, torch.bfloat16), (24, 2048, 8192, torch.float16), (24, 2048, 2048, torch.float16)]:
    x = torch.randn(b, m, k, device="cuda").to(dt) / k ** 0.5
    a = torch.bmm(x[:, :, :m], x[:, :, :m].mT)
    out = symmetric_baddbmm(x, x)
    ref = torch.bmm(x, x.mT)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    t_k = time_cuda(lambda: symmetric_baddbmm(x, x), 3, 20)
    cfg = tk.symmetric_product_tuned.best_config
    t_b = time_cuda(lambda: torch.bmm(x, x.mT), 3, 20)
    t_k2 = time_cuda(lambda: symmetric_baddbmm(a, a.mT, alpha=2.0, beta=-4.7, add=a), 3, 20)
    t_b2 = time_cuda(lambda: torch.baddbmm(a, a, a, beta=-4.7, alpha=2.0), 3, 20)
    print(f"{b}x{m}x{k} {str(dt)[6:]}: XX^T kernel {t_k:.3f} ms, bmm {t_b:.3f} ms ({t_k / t_b:.2f}x), rel diff {err:.1e}, "
          f"config {cfg}; A^2+A kernel {t_k2:.3f}, baddbmm {t_b2:.3f} ({t_k2 / t_b2:.2f}x)", flush=True)
PY
echo "[$(date +%T)] tests" | tee -a "$OUT/session.log"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_ns_symmetric.py tests/kernels/test_gpu.py \
  -k "symmetric or newton_schulz or gram or muon or m3 or delta or kernel_equals_baddbmm or mirrors or iterations or rounding" \
  > "$OUT/tests.log" 2>&1; tail -3 "$OUT/tests.log" | tee -a "$OUT/session.log"
echo "[$(date +%T)] ns_accuracy" | tee -a "$OUT/session.log"
timeout 100 python3 -m benchmarks.ns_accuracy --device cuda --shapes 2048x2048,2048x8192 --batch 24 \
  > "$OUT/ns_accuracy.txt" 2>&1; tail -24 "$OUT/ns_accuracy.txt"
echo "[$(date +%T)] speed" | tee -a "$OUT/session.log"
timeout 150 python3 -m benchmarks run --suite speed --device cuda --optimizers 'AdamW(fused)' Muon MuonMemory M3 DeltaMomentum \
  --out "$OUT/speed" > "$OUT/speed.log" 2>&1; grep "^|" "$OUT/speed/results.md" | cut -d'|' -f2-5,10-13
echo "[$(date +%T)] done" | tee -a "$OUT/session.log"
