"""One-off: does a program that walks several blocks of its row (the row's scalars and pointers
loaded once) make adam_kernel faster in bf16? Kernel-only timing, against torch's fused AdamW step,
every variant checked against the shipped kernel's result. Run: PYTHONPATH=. python <this file>."""
import os, torch, triton, triton.language as tl
from deepopt.kernels.tables import RowSet, scalar_table
from deepopt.kernels.launch import tl_dtype
from deepopt.kernels.triton_lib import _row, _col, _ld, _grad_p, _cast, _upto
from deepopt.levels.adaptive.triton_kernels import adam_kernel
from benchmarks.speed import gpt_param_shapes

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1, a check of the script


@triton.jit
def adam_iters(ptrs, numel, blk_row, blk_start, found, scal, c_m, c_g, c_v, c_g2, eps, decay, wd,
               NCOL: tl.constexpr, NSCAL: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr,
               S_DT: tl.constexpr, COUPLED: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
               ALIGNED: tl.constexpr = False, CHECK: tl.constexpr = False):
    pid = tl.program_id(0)
    row = tl.load(blk_row + pid).to(tl.int64)
    start = tl.load(blk_start + pid)
    n = _upto(tl.load(numel + row), found, CHECK)
    pp = _col(ptrs, row, 0, NCOL, P_DT, ALIGNED)
    gp = _col(ptrs, row, 1, NCOL, G_DT, ALIGNED)
    mp = _col(ptrs, row, 2, NCOL, S_DT, ALIGNED)
    vp = _col(ptrs, row, 3, NCOL, S_DT, ALIGNED)
    s1 = tl.load(scal + row * NSCAL)
    s2 = tl.load(scal + row * NSCAL + 1)
    for i in tl.static_range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        if ALIGNED:
            offs = tl.max_contiguous(tl.multiple_of(offs, 16), BLOCK)
        mask = offs < n
        g = _ld(gp, offs, mask)
        p = _ld(pp, offs, mask)
        m = c_m * _ld(mp, offs, mask) + c_g * g
        v = c_v * _ld(vp, offs, mask) + c_g2 * g * g
        tl.store(mp + offs, _cast(m, S_DT), mask=mask)
        tl.store(vp + offs, _cast(v, S_DT), mask=mask)
        tl.store(pp + offs, _cast(p * decay - s1 * m / (tl.sqrt(v) * s2 + eps), P_DT), mask=mask)


def ev(fn, n=20):
    if DEV == "cpu":
        fn()
        return 1.0
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(True), torch.cuda.Event(True)
    ts = []
    for _ in range(n):
        a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


for rep in range(2 if DEV == "cuda" else 1):
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        ps = [torch.randn(s, device=DEV, dtype=dtype) for _, s in (gpt_param_shapes(layers=12) if DEV == "cuda" else [("a", (3, 1000)), ("b", (64, 48))] * 3)]
        gs = [torch.randn_like(p) for p in ps]
        ms = [torch.zeros_like(p) for p in ps]; vs = [torch.rand_like(p) for p in ps]
        nparam = sum(p.numel() for p in ps)
        tp = [p.clone().requires_grad_() for p in ps]
        for p, g in zip(tp, gs):
            p.grad = g
        opt = torch.optim.AdamW(tp, lr=1e-4, weight_decay=0.0, fused=DEV == "cuda"); opt.step()
        base = ev(opt.step)
        del opt, tp
        scal = scalar_table([[1e-3, 1.0]] * len(ps), DEV)
        flag = torch.zeros(1, device=DEV)
        out = [f"{dtype}: {nparam/1e9:.2f} B params, torch fused AdamW step {base:.3f} ms"]

        def run(kern, block, warps, iters, cols):
            rows = RowSet(cols, mutable=(0, 2, 3))
            t = rows.tables(block * (iters or 1))
            extra = {} if iters is None else {"ITERS": iters}
            def go():
                kern[t.grid](t.ptrs, t.numel, t.blk_row, t.blk_start, flag, scal, 0.9, 0.1, 0.999, 0.001, 1e-8, 1.0, 0.0,
                             NCOL=4, NSCAL=2, P_DT=tl_dtype(dtype), G_DT=tl_dtype(dtype), S_DT=tl_dtype(dtype),
                             COUPLED=False, BLOCK=block, ALIGNED=t.aligned, CHECK=True, num_warps=warps, **extra)
            return go, t.aligned

        # correctness: one step of each variant from the same start equals the shipped kernel's
        small = [(c.clone(), g, m.clone(), v.clone()) for c, g, m, v in zip(ps[:6], gs, ms, vs)]
        ref = [[t.clone() for t in r] for r in small]
        run(adam_kernel, 512, 1, None, [list(r) for r in ref])[0]()
        for block, warps, iters in ((512, 1, 4), (1024, 4, 4)):
            got = [[t.clone() for t in r] for r in small]
            run(adam_iters, block, warps, iters, [list(r) for r in got])[0]()
            diff = max(float((a.float() - b.float()).abs().max()) for ra, rb in zip(ref, got) for a, b in zip(ra, rb))
            out.append(f"  check ITERS {iters} BLOCK {block}: max |diff| vs shipped kernel {diff:.3g}")
        cols = [[p, g, m, v] for p, g, m, v in zip(ps, gs, ms, vs)]
        for kern, block, warps, iters in ((adam_kernel, 512, 1, 1), (adam_kernel, 1024, 4, 1),
                                          (adam_iters, 512, 1, 2), (adam_iters, 512, 1, 4), (adam_iters, 512, 1, 8),
                                          (adam_iters, 512, 2, 4), (adam_iters, 1024, 2, 4), (adam_iters, 1024, 4, 2),
                                          (adam_iters, 1024, 4, 4), (adam_iters, 1024, 4, 8), (adam_iters, 2048, 4, 4),
                                          (adam_iters, 2048, 8, 4)):
            go, al = run(kern, block, warps, None if kern is adam_kernel else iters, cols)
            t = ev(go)
            name = "shipped" if kern is adam_kernel else "iters"
            out.append(f"  {name:7s} BLOCK {block:5d} warps {warps:2d} ITERS {iters}: {t:.3f} ms = {t/base:.2f}x (aligned={al})")
        print("\n".join(out), flush=True)
        del ps, gs, ms, vs, cols
        torch.cuda.empty_cache()
