"""One-off: why is deepopt's adam_kernel slower than torch fused AdamW? Kernel-only timing of variants."""
import torch, triton, triton.language as tl
from deepopt.kernels.tables import RowSet, scalar_table
from deepopt.kernels.launch import tl_dtype
from deepopt.kernels.triton_lib import _row, _col, _ld, _grad, _cast
from deepopt.levels.adaptive.triton_kernels import adam_kernel
from benchmarks.speed import gpt_param_shapes

@triton.jit
def adam_plaincast(ptrs, numel, blk_row, blk_start, found, scal, c_m, c_g, c_v, c_g2, eps, decay, wd,
                NCOL: tl.constexpr, NSCAL: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr,
                S_DT: tl.constexpr, COUPLED: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr = False,
                CHECK: tl.constexpr = False):
    row, offs, mask = _row(blk_row, blk_start, numel, found, BLOCK, ALIGNED, CHECK)
    pp = _col(ptrs, row, 0, NCOL, P_DT, ALIGNED)
    g = _grad(ptrs, row, offs, mask, wd, pp, NCOL, G_DT, COUPLED, ALIGNED)
    mp = _col(ptrs, row, 2, NCOL, S_DT, ALIGNED)
    vp = _col(ptrs, row, 3, NCOL, S_DT, ALIGNED)
    m = c_m * _ld(mp, offs, mask) + c_g * g
    v = c_v * _ld(vp, offs, mask) + c_g2 * g * g
    tl.store(mp + offs, m.to(S_DT), mask=mask)
    tl.store(vp + offs, v.to(S_DT), mask=mask)
    s1 = tl.load(scal + row * NSCAL)
    s2 = tl.load(scal + row * NSCAL + 1)
    p = _ld(pp, offs, mask)
    tl.store(pp + offs, (p * decay - s1 * m / (tl.sqrt(v) * s2 + eps)).to(P_DT), mask=mask)

def ev(fn, n=20):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(True), torch.cuda.Event(True)
    ts = []
    for _ in range(n):
        a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort(); return ts[len(ts)//2]

for rep in range(2):
  for dtype in (torch.float32, torch.bfloat16):
      ps = [torch.randn(s, device="cuda", dtype=dtype) for _, s in gpt_param_shapes(layers=12)]
      gs = [torch.randn_like(p) for p in ps]
      ms = [torch.zeros_like(p) for p in ps]; vs = [torch.rand_like(p) for p in ps]
      nparam = sum(p.numel() for p in ps)
      tp = [p.clone().requires_grad_() for p in ps]
      for p, g in zip(tp, gs): p.grad = g
      opt = torch.optim.AdamW(tp, lr=1e-4, weight_decay=0.0, fused=True); opt.step()
      base = ev(opt.step)
      rows = RowSet([[p, g, m, v] for p, g, m, v in zip(ps, gs, ms, vs)], mutable=(0, 2, 3))
      scal = scalar_table([[1e-3, 1.0]] * len(ps), "cuda")
      flag = torch.zeros(1, device="cuda")
      out = [f"{dtype}: {nparam/1e9:.2f} B params, torch fused AdamW step {base:.3f} ms"]
      for kern, name in ((adam_kernel, "bitcast"),):
          for block, warps in ((512, 1), (512, 2), (1024, 1), (1024, 2), (1024, 4), (2048, 2), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 16)):
              t = rows.tables(block)
              for check in (True,):
                  def go():
                      kern[t.grid](t.ptrs, t.numel, t.blk_row, t.blk_start, flag, scal, 0.9, 0.1, 0.999, 0.001, 1e-8, 1.0, 0.0,
                                   NCOL=4, NSCAL=2, P_DT=tl_dtype(dtype), G_DT=tl_dtype(dtype), S_DT=tl_dtype(dtype),
                                   COUPLED=False, BLOCK=block, ALIGNED=t.aligned, CHECK=check, num_warps=warps)
                  ms_ = ev(go)
                  out.append(f"  {name:9s} BLOCK {block:5d} warps {warps:2d} check {int(check)}: {ms_:.3f} ms = {ms_/base:.2f}x (aligned={t.aligned})")
      print("\n".join(out), flush=True)
