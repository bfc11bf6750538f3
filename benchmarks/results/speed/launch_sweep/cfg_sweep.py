"""One-off: whole opt.step time of AdamMemory / MomentumMemory vs torch fused, per launch config."""
import torch
import sys, deepopt.kernels.launch
L = sys.modules["deepopt.kernels.launch"]
from benchmarks.speed import gpt_param_shapes, speed_optimizers

def ev(fn, n=15):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(True), torch.cuda.Event(True); ts = []
    for _ in range(n):
        a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort(); return ts[len(ts) // 2]

for dtype, size, cfgs in ((torch.bfloat16, 2, [(512, 1), (1024, 2), (2048, 4), (256, 1), (1024, 1), (2048, 2)]),
                          (torch.float32, 4, [(1024, 4), (2048, 8), (512, 2), (512, 1)])):
    params = [torch.randn(s, device="cuda", dtype=dtype, requires_grad=True) for _, s in gpt_param_shapes(layers=12)]
    for p in params: p.grad = torch.randn_like(p)
    mk = speed_optimizers(["AdamW(fused)", "SGD(fused)", "AdamMemory", "MomentumMemory"], "cuda")
    base = {n: ev(mk[n](params).step) for n in ("AdamW(fused)", "SGD(fused)")}
    print(dtype, {k: round(v, 3) for k, v in base.items()}, flush=True)
    import deepopt
    L.CONFIGS[size] = cfgs[0]
    for name, ref in (("AdamMemory", "AdamW(fused)"), ("MomentumMemory", "SGD(fused)")):
        kw = dict(weight_decay=0.0) if name == "AdamMemory" else {}
        t = ev(getattr(deepopt, name)(params, lr=1e-4, nonfinite="ignore", **kw).step)
        print(f"  nonfinite=ignore {cfgs[0]}: {name} {t:.3f} ms = {t / base[ref]:.2f}x", flush=True)
    for cfg in cfgs:
        L.CONFIGS[size] = cfg
        for name, ref in (("AdamMemory", "AdamW(fused)"), ("MomentumMemory", "SGD(fused)")):
            t = ev(mk[name](params).step)
            print(f"  {cfg}: {name} {t:.3f} ms = {t / base[ref]:.2f}x", flush=True)
