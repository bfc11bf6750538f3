"""Operators and bytes of one language-model training step, without a GPU: a device-free cost model.

One training step (forward, backward and an AdamW step; the loss of ``model.loss``) runs under a
``TorchDispatchMode`` that sees every aten operator after autograd, forward and backward alike,
and tallies for each: the number of calls and the bytes it reads and writes (the distinct memory
span of every tensor input and output: a broadcast (stride-0) input counts once; view operators
count zero bytes and are not counted as operators, nor are allocations such as ``empty_like``, which
move no bytes; an ``out=`` argument is written, not read, so it counts once, as an output, and a
factory such as ``new_zeros`` or ``ones_like`` reads nothing). Bytes moved is a proxy for the time of a
memory-bound GPU step, operator count for the host's launch overhead. Operators are grouped by
name and input shapes, and by call site: the innermost frames of the repository for a forward
operator and, for a backward operator, the forward call site of the autograd node running it
(recorded by anomaly mode).

``--device meta`` (the default) runs on meta tensors: no arithmetic, so the real sizes (batch 32 x
256 tokens) are counted in seconds; ``--device cpu`` (or ``cuda``) also times the step: the median
of ``--repeat`` steps after a warm-up.

Usage: ``python -m benchmarks.layers.lm_traffic [--models TitansLM "HopeLM()"] [--device meta]
[--batch 32] [--top 25] [--out DIR]``.

Example:
    >>> x = torch.ones(4, 8)
    >>> with Traffic() as t:
    ...     y = x.sum(0).view(2, 4)  # one operator: reads 128 bytes, writes 32 (a view counts nothing)
    >>> t.total()
    (1, 160)
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..outdir import announce, run_dir

ROOT = str(Path(__file__).resolve().parents[2])


def _span_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct memory a tensor covers (a broadcast dimension counts once)."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
    return min(span, t.numel()) * t.element_size()


def _tensors(tree):
    out = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                walk(y)
        elif isinstance(x, dict):
            for y in x.values():
                walk(y)

    walk(tree)
    return out


def _site(frames, depth: int) -> str:
    """The ``depth`` innermost frames inside the repository, as file:line function (not those of
    installed packages, even from a virtual environment inside the repository)."""
    mine = [f for f in frames if f.filename.startswith(ROOT) and "lm_traffic" not in f.filename
            and "site-packages" not in f.filename]
    return " < ".join(f"{Path(f.filename).relative_to(ROOT)}:{f.lineno} {f.name}" for f in reversed(mine[-depth:]))


_FREE = (torch.ops.aten.detach.default, torch.ops.aten.lift_fresh.default, torch.ops.aten._unsafe_view.default)
_ALLOC = ("empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided")  # allocate, move no bytes


def _read_args(func, args, kwargs):
    """The arguments an operator reads: all but its ``out=`` arguments (keyword-only and written);
    none for a factory that takes a tensor only for its dtype and device (``new_zeros``, ``ones_like``)."""
    name = func.__name__.split(".")[0]
    if name.startswith("new_") or name.endswith("_like"):
        return ()
    outs = {a.name for a in func._schema.arguments if a.kwarg_only and a.alias_info is not None and a.alias_info.is_write}
    return args, {k: v for k, v in (kwargs or {}).items() if k not in outs}


class Traffic(TorchDispatchMode):
    """Tallies calls and bytes (inputs + outputs) of every non-view aten operator in its scope.

    ``by_op`` (name, input shapes) and ``by_site`` (backward flag, name, call site) map to
    [calls, bytes]. Call sites need ``sites=True`` (slower: a stack walk per operator).
    """

    def __init__(self, sites: bool = False, depth: int = 3):
        super().__init__()
        self.sites, self.depth = sites, depth
        self.by_op = defaultdict(lambda: [0, 0])
        self.by_site = defaultdict(lambda: [0, 0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func in _FREE or func.__name__.split(".")[0] in _ALLOC:
            return out
        ins = _tensors(_read_args(func, args, kwargs))
        nbytes = sum(_span_bytes(t) for t in ins) + sum(_span_bytes(t) for t in _tensors(out))
        name = func.__name__
        shapes = str([list(t.shape) for t in ins])[:90]
        for table, key in ((self.by_op, (name, shapes)),) + (((self.by_site, self._site(name)),) if self.sites else ()):
            table[key][0] += 1
            table[key][1] += nbytes
        return out

    def _site(self, name):
        node = torch._C._current_autograd_node()
        if node is not None:
            frames = _parse(node.metadata.get("traceback_", []))
            return ("bwd", name, f"{node.name()} @ {_site(frames, self.depth)}")
        return ("fwd", name, _site(traceback.extract_stack(), self.depth))

    def total(self):
        """(operators, bytes) of everything seen."""
        return sum(c for c, _ in self.by_op.values()), sum(b for _, b in self.by_op.values())


def _parse(tb) -> list:
    """Frames (FrameSummary) from anomaly mode's recorded forward traceback (a list of strings)."""
    frames = []
    for entry in tb if isinstance(tb, list) else [tb]:
        for line in str(entry).splitlines():
            line = line.strip()
            if line.startswith('File "'):
                file, _, rest = line[6:].partition('", line ')
                lineno, _, func = rest.partition(", in ")
                frames.append(traceback.FrameSummary(file, int(lineno), func.strip(), line=""))
    return frames


def training_step(model, vocab: int, batch: int, seq: int, device: str):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    tokens = torch.randint(0, vocab, (batch, seq + 1), device=device)

    def step():
        opt.zero_grad(set_to_none=False)
        model.loss(tokens).backward()
        opt.step()

    return step


def measure(build, vocab: int, batch: int, seq: int, device: str, sites: bool, repeat: int = 3):
    """(Traffic of one step, median CPU/GPU ms of ``repeat`` steps or None on meta)."""
    torch.manual_seed(0)
    model = build().to(device)
    step = training_step(model, vocab, batch, seq, device)
    ms = None
    if device != "meta":
        step()  # warm-up (optimizer state)
        times = []
        for _ in range(repeat):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - t0))
        ms = sorted(times)[len(times) // 2]
    else:
        step()
    with torch.autograd.set_detect_anomaly(sites, check_nan=False), Traffic(sites=sites) as t:
        step()
    return t, ms


def report(name: str, t: Traffic, ms, top: int) -> list[str]:
    ops, nbytes = t.total()
    lines = [f"## {name}: {ops} operators, {nbytes / 1e6:.1f} MB moved" + (f", {ms:.0f} ms" if ms else ""), ""]
    lines += ["| operator | input shapes | calls | MB |", "|---|---|---|---|"]
    for (op, shapes), (c, b) in sorted(t.by_op.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"| {op} | {shapes} | {c} | {b / 1e6:.1f} |")
    if t.by_site:
        lines += ["", "| pass | operator | call site | calls | MB |", "|---|---|---|---|---|"]
        for (p, op, site), (c, b) in sorted(t.by_site.items(), key=lambda kv: -kv[1][1])[:top]:
            lines.append(f"| {p} | {op} | {site} | {c} | {b / 1e6:.1f} |")
    return lines


def main(argv=None) -> list[dict]:
    from .lm_steps import add_size_arguments, lm_builders

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="output folder (default: a fresh ./runs/lm_traffic-<time>/)")
    p.add_argument("--models", nargs="+", default=["TransformerLM", "TitansLM", "HopeLM()"])
    add_size_arguments(p, device="meta")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--repeat", type=int, default=3, help="timed steps (the median is reported; not on meta)")
    p.add_argument("--no-sites", action="store_true", help="skip the call-site table (faster)")
    a = p.parse_args(argv)
    a.out = run_dir("lm_traffic", a.out)
    import nl_layers

    builders = lm_builders(256, a.dim, a.depth, a.heads)
    rows, lines = [], []
    with nl_layers.value_checks(False):  # meta tensors have no values to check
        for name in a.models:
            t, ms = measure(builders[name], 256, a.batch, a.seq, a.device, not a.no_sites, a.repeat)
            ops, nbytes = t.total()
            rows.append({"model": name, "ops": ops, "mb": round(nbytes / 1e6, 1), "ms": None if ms is None else round(ms, 1)})
            print(json.dumps(rows[-1]), flush=True)
            lines += report(name, t, ms, a.top) + [""]
    head = ["| model | operators/step | MB moved/step | ms/step |", "|---|---|---|---|"]
    head += [f"| {r['model']} | {r['ops']} | {r['mb']:.1f} | {'-' if r['ms'] is None else r['ms']} |" for r in rows]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_traffic.json").write_text(json.dumps(rows, indent=1))
    (out / "lm_traffic.md").write_text("\n".join(head + [""] + lines) + "\n")
    print("\n".join(head))
    announce(str(out))
    return rows


if __name__ == "__main__":
    main()
