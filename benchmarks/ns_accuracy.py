"""Newton-Schulz accuracy and time: torch's bf16 iteration against deepopt's forms on the same inputs.

For each input family (:func:`inputs`) and shape, four outputs of the same quintic iteration
(torch's coefficients, 5 steps): torch's own (``torch.optim._muon._zeropower_via_newtonschulz``,
bf16), deepopt's ``standard`` form (bf16), its ``gram`` form (float16 products, restarted) and its
``auto`` form (the default of MuonMemory and M3: on CUDA the Gram form for wide matrices, symmetric
products on their upper triangle of tiles for every shape; on the CPU the standard form), all on the same
bf16-rounded input, and the exact iteration ``O_64`` (float64). Metrics
(:func:`metrics`; ``m <= n``, ``O`` as ``m x n``):

* ``dev = ||O - O_64||_F / ||O_64||_F``: the rounding error. Every form computes the same function,
  so this compares like with like.
* ``orth = ||O O^T - I||_F / sqrt(m)``: the raw orthogonality error. Torch's coefficients do not
  converge to 1 (singular values end in about [0.68, 1.13]), and directions of tiny or zero input
  singular value stay near 0 after five steps (error 1 each, even in exact arithmetic); rounding
  noise there *lowers* ``orth`` (it puts ~0.1 into null directions), so on rank-deficient inputs a
  lower ``orth`` is no sign of a better orthogonalization.
* ``band = ||U_b^T (O O^T - I) U_b||_F / sqrt(k)``: ``orth`` on the ``k`` left singular directions
  ``U_b`` of the input that the exact iteration brings to at least 0.5, the directions that get
  orthogonalized at all.

On CUDA it also times the forms (CUDA events, median) at the speed suite's shapes, the gram and
auto forms also with full products in place of the symmetric ones (``gram/full``, ``auto/full``:
the forms before symmetric products). Run
``python -m benchmarks.ns_accuracy [--device cuda] [--shapes 2048x8192,...]``.

Example (the metrics on a tiny case):
    >>> import torch
    >>> M = inputs(8, 32)["gauss"]
    >>> r = metrics(exact(M), M, exact(M))
    >>> r["dev"], round(r["orth"], 2) == round(r["band"], 2)
    (0.0, True)
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from deepopt.levels.orthogonal import NS_COEFFICIENTS, newton_schulz_many

from .speed import time_cuda

__all__ = ["inputs", "exact", "metrics", "torch_ns", "FAMILIES", "main"]

FAMILIES = ("gauss", "momentum", "spike", "logspec", "lowrank+noise", "rankdef")
SPEED_SHAPES = ((2048, 2048), (8192, 2048), (2048, 8192))


def inputs(m: int, n: int, seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The input families (float32 holding bf16-rounded values, so every form sees the same matrix):

    gauss: i.i.d. N(0, 1); momentum: an EMA (0.95) of 20 Gaussian gradients around a rank-4 mean;
    spike: singular values (100, 1, ..., 1); logspec: singular values log-spaced over 1..1e-4;
    lowrank+noise: rank ``min(m,n)/32`` plus 1e-2 Gaussian noise; rankdef: exact rank ``min(m,n)/2``.
    """
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    f64 = dict(generator=g, dtype=torch.float64)

    def with_spectrum(s):
        u, _ = torch.linalg.qr(torch.randn(m, k, **f64))
        v, _ = torch.linalg.qr(torch.randn(n, k, **f64))
        return (u * s) @ v.T

    mean = torch.randn(m, 4, **f64) @ torch.randn(4, n, **f64) / 2
    buf = torch.zeros(m, n, dtype=torch.float64)
    for _ in range(20):
        buf = 0.95 * buf + 0.05 * (mean + torch.randn(m, n, **f64))
    spike = torch.ones(k, dtype=torch.float64)
    spike[0] = 100.0
    r = max(1, k // 32)
    out = {
        "gauss": torch.randn(m, n, **f64),
        "momentum": buf,
        "spike": with_spectrum(spike),
        "logspec": with_spectrum(torch.logspace(0, -4, k, dtype=torch.float64)),
        "lowrank+noise": torch.randn(m, r, **f64) @ torch.randn(r, n, **f64) / math.sqrt(r)
        + 1e-2 * torch.randn(m, n, **f64),
        "rankdef": torch.randn(m, k // 2 or 1, **f64) @ torch.randn(k // 2 or 1, n, **f64),
    }
    return {name: x.to(torch.bfloat16).to(device=device, dtype=torch.float32) for name, x in out.items()}


def exact(m: torch.Tensor, coefficients=NS_COEFFICIENTS, steps: int = 5) -> torch.Tensor:
    """The iteration in float64 (the reference every form approximates)."""
    return newton_schulz_many([m.double()], coefficients, steps, dtype=None, method="standard")[0]


def torch_ns(m: torch.Tensor, coefficients=NS_COEFFICIENTS, steps: int = 5) -> torch.Tensor:
    """``torch.optim.Muon``'s own iteration (bf16)."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    return _zeropower_via_newtonschulz(m, tuple(coefficients), steps, 1e-7)


def metrics(o: torch.Tensor, m: torch.Tensor, o64: torch.Tensor, svd=None) -> dict[str, float]:
    """``dev``, ``orth`` and ``band`` of the output ``o`` of input ``m`` (module docstring);
    ``svd``: ``torch.linalg.svd`` of ``m`` (as ``m x n``, ``m <= n``, float64), if already computed."""
    o, o64, m = o.double().cpu(), o64.double().cpu(), m.double().cpu()
    if o.shape[0] > o.shape[1]:
        o, o64, m = o.mT, o64.mT, m.mT
    eye = torch.eye(o.shape[0], dtype=torch.float64)
    err = o @ o.mT - eye
    u, _, vh = svd if svd is not None else torch.linalg.svd(m, full_matrices=False)
    gain = ((u.mT @ o64) * vh).sum(1)  # the exact output's singular value along each input direction
    ub = u[:, gain >= 0.5]
    return {"dev": float((o - o64).norm() / o64.norm()), "orth": float(err.norm() / o.shape[0] ** 0.5),
            "band": float((ub.mT @ err @ ub).norm() / max(1, ub.shape[1]) ** 0.5), "k": int(ub.shape[1])}


def accuracy_rows(shapes, families=FAMILIES, seed: int = 0, device: str = "cpu") -> list[dict]:
    rows = []
    for m, n in shapes:
        for name, x in inputs(m, n, seed, device).items():
            if name not in families:
                continue
            o64 = exact(x).cpu()
            wide = x.double().cpu()
            svd = torch.linalg.svd(wide.mT if m > n else wide, full_matrices=False)  # once per input
            outs = {"exact": o64, "torch": torch_ns(x),
                    "standard": newton_schulz_many([x], method="standard")[0],
                    "gram": newton_schulz_many([x], method="gram")[0],
                    "auto": newton_schulz_many([x], method="auto")[0]}
            for form, o in outs.items():
                rows.append({"shape": f"{m}x{n}", "family": name, "form": form, **metrics(o, x, o64, svd)})
    return rows


def time_forms(shapes, batch: int = 8, repeats: int = 10) -> list[dict]:
    """Median ms of one batched call per form on CUDA (``batch`` matrices of each shape); the gram
    and auto forms also with full products (``gram/full``, ``auto/full``)."""
    from deepopt.levels.orthogonal import batched

    rows = []
    for m, n in shapes:
        x = torch.randn(batch, m, n, device="cuda").bfloat16()
        for form, full in [("standard", False), ("gram", False), ("auto", False), ("gram", True), ("auto", True)]:
            saved = batched._use_symmetric
            if full:
                batched._use_symmetric = lambda method, device=None: False
            try:
                ms = time_cuda(lambda: newton_schulz_many(list(x), method=form), warmup=3, repeats=repeats)
            finally:
                batched._use_symmetric = saved
            rows.append({"shape": f"{m}x{n}", "form": form + "/full" * full, "batch": batch, "ms": ms})
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default=None, help="e.g. 256x1024,1024x256 (default: the speed suite's "
                    "shapes on CUDA, 256x1024 and 1024x256 on the CPU)")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    else:
        shapes = list(SPEED_SHAPES) if args.device == "cuda" else [(256, 1024), (1024, 256)]
    rows = accuracy_rows(shapes, args.families.split(","), device=args.device)
    print(f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}; torch {torch.__version__}")
    forms = ("exact (float64)", "torch (bf16)", "standard", "gram", "auto")
    print(f"{'shape':>10} {'family':>14} | " + " | ".join(f"{f:>20}" for f in forms))
    print(f"{'':>10} {'':>14} | " + " | ".join(f"{'dev   orth   band':>20}" for _ in forms))
    for i in range(0, len(rows), len(forms)):
        r = rows[i]
        cells = [f"{x['dev']:.4f} {x['orth']:.4f} {x['band']:.4f}" for x in rows[i:i + len(forms)]]
        print(f"{r['shape']:>10} {r['family']:>14} | " + " | ".join(f"{c:>20}" for c in cells))
    times = time_forms(shapes, args.batch) if args.device == "cuda" else []
    for t in times:
        print(f"time {t['shape']:>10} {t['form']:>10}: {t['ms']:.3f} ms for {t['batch']} matrices")
    return {"accuracy": rows, "times": times}


if __name__ == "__main__":
    main(sys.argv[1:])
