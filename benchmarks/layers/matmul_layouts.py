"""Every matrix product of one language-model training step, timed as it runs and in other layouts.

One training step (forward, backward, AdamW) runs under a ``TorchDispatchMode`` that records each
matrix product (``mm``, ``bmm``, ``addmm``, ``baddbmm``, in place and ``out=`` forms): its operand
sizes, strides and storage offsets, and its call site (the forward call site of the autograd node
for a backward product, as :mod:`.lm_traffic`). Each distinct product is then replayed alone on
operands with exactly those strides and timed (``--repeat`` calls back to back between CUDA events,
the median of three such runs), beside:

- ``contiguous``: the same product on contiguous copies of its operands (the copies not timed);
- ``swapped``: the transposed problem, C^T = B^T A^T (cuBLAS sees the other transposition flags);
- ``split`` (products with an addend): the plain product, then ``add_`` of the addend;
- ``padded``: contiguous operands with M, N and K rounded up to multiples of 8 (zeros): what
  cuBLAS picks when no extent forces its narrow-alignment kernels (the extra rows cost < 1%
  here).

For each it prints the achieved GB/s (operands and result once each) and TFLOP/s, and the time a
step would save with the best variant over all its calls: which layouts leave cuBLAS on a slow
kernel, and what a change of layout at that call site would buy.

Usage: ``python -m benchmarks.layers.matmul_layouts [--model "HopeLM()"] [--out DIR]`` (GPU);
``--device cpu --dim 16 --depth 1 --batch 2 --seq 8 --repeat 2`` is a smoke run.

Example (the bytes and flops of a product):
    >>> a, b = torch.ones(4, 3), torch.ones(3, 2)
    >>> Product.of(torch.ops.aten.mm.default, (a, b), {}, "site").work()
    (104, 48)
"""

from __future__ import annotations

import argparse
import json
import statistics
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ..outdir import announce, run_dir
from .lm_traffic import _parse, _site, training_step

aten = torch.ops.aten
_PRODUCTS = {"mm", "bmm", "addmm", "baddbmm", "addmm_", "baddbmm_"}


@dataclass(frozen=True)
class Layout:
    size: tuple
    stride: tuple
    offset: int

    @staticmethod
    def of(t: torch.Tensor) -> "Layout":
        return Layout(tuple(t.shape), tuple(t.stride()), t.storage_offset())

    def make(self, device, dtype) -> torch.Tensor:
        span = self.offset + 1 + sum((s - 1) * st for s, st in zip(self.size, self.stride))
        base = torch.randn(max(span, 1), device=device, dtype=dtype)
        return base.as_strided(self.size, self.stride, self.offset)


@dataclass(frozen=True)
class Product:
    """One product's signature: the operator name, its (A, B) and optional addend layouts."""

    name: str
    a: Layout
    b: Layout
    addend: Layout | None
    alpha_beta: tuple
    site: str = field(compare=False, hash=False, default="")

    @staticmethod
    def of(func, args, kwargs, site) -> "Product":
        name = func.__name__.split(".")[0]
        if name in ("mm", "bmm"):
            a, b, c = args[0], args[1], None
        else:
            c, a, b = args[0], args[1], args[2]
        ab = (kwargs.get("beta", 1), kwargs.get("alpha", 1))
        return Product(name, Layout.of(a), Layout.of(b), Layout.of(c) if c is not None else None, ab, site)

    def work(self) -> tuple[int, int]:
        """(bytes of A, B, the addend and the result once each at 4 bytes, flops)."""
        *batch, m, k = self.a.size
        n = self.b.size[-1]
        nb = 1
        for s in batch:
            nb *= s
        elems = nb * (m * k + k * n + m * n) + (nb * m * n if self.addend is not None else 0)
        return 4 * elems, 2 * nb * m * n * k

    def label(self) -> str:
        def lay(x: Layout):
            return f"{list(x.size)}s{list(x.stride)}"
        add = f" + {lay(self.addend)}" if self.addend is not None else ""
        return f"{self.name} {lay(self.a)} @ {lay(self.b)}{add}"


class Recorder(TorchDispatchMode):
    """Records each matrix product (signature -> [calls, first call site])."""

    def __init__(self):
        super().__init__()
        self.seen: dict[Product, list] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.__name__.split(".")[0] in _PRODUCTS:
            p = Product.of(func, args, kwargs, self._site())
            entry = self.seen.setdefault(p, [0, p.site])
            entry[0] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _site() -> str:
        node = torch._C._current_autograd_node()
        if node is not None:
            return f"bwd {node.name()} @ {_site(_parse(node.metadata.get('traceback_', [])), 3)}"
        return "fwd " + _site([f for f in traceback.extract_stack() if f.filename != __file__], 3)


def _runner(p: Product, variant: str, device, dtype):
    a, b = p.a.make(device, dtype), p.b.make(device, dtype)
    c = p.addend.make(device, dtype) if p.addend is not None else None
    beta, alpha = p.alpha_beta
    if variant in ("contiguous", "padded"):
        a, b = a.contiguous(), b.contiguous()
        c = c.contiguous() if c is not None else None
    if variant == "padded":
        up = lambda n: -(-n // 8) * 8  # noqa: E731
        pad = lambda t: F.pad(t, (0, up(t.shape[-1]) - t.shape[-1], 0, up(t.shape[-2]) - t.shape[-2]))  # noqa: E731
        a, b = pad(a), pad(b)
        if c is not None:
            c = F.pad(c, (0, up(c.shape[-1]) - c.shape[-1])) if c.dim() == 1 else pad(c)
    batched = p.a.size.__len__() == 3
    mm = torch.bmm if batched else torch.mm
    if variant == "swapped":  # C^T = B^T A^T: the same result as a transposed view
        if c is None:
            return lambda: mm(b.mT, a.mT).mT
        add = torch.baddbmm if batched else torch.addmm
        ct = c.mT if c.dim() >= 2 else c.unsqueeze(-1)  # a bias (N,) adds along the other side
        return lambda: add(ct, b.mT, a.mT, beta=beta, alpha=alpha).mT
    if c is None:
        return lambda: mm(a, b)
    if variant == "split":
        return lambda: mm(a, b).mul_(alpha).add_(c, alpha=beta) if alpha != 1 else mm(a, b).add_(c, alpha=beta)
    if p.name.endswith("_"):
        inplace = torch.Tensor.baddbmm_ if batched else torch.Tensor.addmm_
        return lambda: inplace(c, a, b, beta=beta, alpha=alpha)
    add = torch.baddbmm if batched else torch.addmm
    return lambda: add(c, a, b, beta=beta, alpha=alpha)


def _time(fn, device, repeat: int) -> float:
    """ms of one call: ``repeat`` calls back to back between two CUDA events (the launches overlap
    the previous kernel, as in a step), the median of three such runs; the wall clock elsewhere."""
    import time

    fn()
    if str(device).startswith("cuda"):
        from ..speed import time_cuda_chain

        return time_cuda_chain(fn, repeats=3, chain=repeat)
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        runs.append(1e3 * (time.perf_counter() - t0) / repeat)
    return statistics.median(runs)


def record(build, vocab: int, batch: int, seq: int, device: str) -> dict:
    torch.manual_seed(0)
    model = build().to(device)
    step = training_step(model, vocab, batch, seq, device)
    step()
    with torch.autograd.set_detect_anomaly(True, check_nan=False), Recorder() as r:
        step()
    return r.seen


def replay(seen: dict, device: str, repeat: int) -> list[dict]:
    rows = []
    for p, (calls, site) in seen.items():
        nbytes, flops = p.work()
        row = {"product": p.label(), "site": site, "calls": calls, "bytes": nbytes, "flops": flops}
        variants = ["as is", "contiguous", "swapped", "padded"] + (["split"] if p.addend is not None else [])
        for v in variants:
            row[v] = _time(_runner(p, v, device, torch.float32), device, repeat)
        rows.append(row)
        del row
    return rows


def table(rows: list[dict]) -> list[str]:
    out = ["| product | call site | calls | as is us | GB/s | TFLOP/s | contiguous us | swapped us | padded us | split us | "
           "best saves us/step |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    total = 0.0
    for r in sorted(rows, key=lambda r: -r["as is"] * r["calls"]):
        t = r["as is"]
        best = min(r[v] for v in ("contiguous", "swapped", "padded", "split") if v in r)
        save = max(0.0, (t - best) * r["calls"]) * 1e3
        total += t * r["calls"]
        split = f"{1e3 * r['split']:.1f}" if "split" in r else "-"
        out.append(f"| {r['product']} | {r['site']} | {r['calls']} | {1e3 * t:.1f} | {r['bytes'] / t / 1e6:.0f} | "
                   f"{r['flops'] / t / 1e9:.1f} | {1e3 * r['contiguous']:.1f} | {1e3 * r['swapped']:.1f} | {split} | "
                   f"{save:.0f} |")
    out += ["", f"products a step, timed alone: {total:.2f} ms"]
    return out


def main(argv=None) -> list[dict]:
    from .lm_steps import add_size_arguments, lm_builders

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="output folder (default: a fresh ./runs/matmul_layouts-<time>/)")
    p.add_argument("--model", default="HopeLM()")
    add_size_arguments(p)
    p.add_argument("--repeat", type=int, default=20)
    a = p.parse_args(argv)
    a.out = run_dir("matmul_layouts", a.out)
    torch.backends.cuda.matmul.allow_tf32 = True  # as the LM benchmarks
    import nl_layers

    with nl_layers.value_checks(False):
        seen = record(lm_builders(256, a.dim, a.depth, a.heads)[a.model], 256, a.batch, a.seq, a.device)
    rows = replay(seen, a.device, a.repeat)
    lines = [f"# {a.model}: matrix products of one training step ({a.device}"
             + (f", {torch.cuda.get_device_name()}" if a.device.startswith("cuda") else "") + ")", ""] + table(rows)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "matmul_layouts.json").write_text(json.dumps(rows, indent=1))
    (out / "matmul_layouts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    announce(str(out))
    return rows


if __name__ == "__main__":
    main()
