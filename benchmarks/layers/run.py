"""Run the ``layers`` suite's three parts, in this order, and collect one row per measurement.

- ``lm``: one AdamW training step of each language model (:mod:`.lm_steps`), fp32 and bf16 autocast.
- ``mixers``: every mixer (:mod:`.mixers`) forward+backward at each T with ``tokens`` per call
  (batch = tokens // T), in ``dtype``.
- ``titans``: the Titans comparison (dim 256, 4 heads, 4K tokens per call, T = 1K / 4K / 16K,
  chunk 16 and 64, bf16 and fp32): our NeuralMemory and SelfModifyingTitans against
  titans-pytorch's NeuralMemory.

Each part gets a share of ``budget_s`` (plus what earlier parts left unused); once it is spent the
remaining rows say so. Within a part, every case runs its shortest T first; after that the
measurement predicted to be cheapest goes next (:func:`cheapest_first`), so a spent budget cuts
the slow layers' long lengths, never the fast layers' ones. A case's longer lengths are skipped
past the per-measurement cap (:class:`~benchmarks.layers.timing.LengthGuard`). One progress line
is printed per row.

Example:
    >>> cfg = LayersConfig.smoke()
    >>> cfg.lengths, cfg.tokens
    ((8, 16), 32)
    >>> progress_line({"section": "mixers", "name": "SDPA attention", "batch": 4, "length": 8, "tokens": 32,
    ...                "tokens_per_s": 1.5e6, "ms": 0.02, "peak_GiB": None, "calls": 5, "seconds": 0.1})
    'layers: mixers | SDPA attention | 4 x 8 | 1.50 M tok/s, 0.0 ms, 5 calls | 0.1 s'
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .lm_steps import lm_cases
from .mixers import mixer_cases, titans_cases
from .timing import Deadline, LengthGuard, clock_for, length_schedule, measure

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PARTS = ("lm", "mixers", "titans")  # run order: the cheap LM table first, its unused budget carries on
SHARES = {"lm": 0.25, "mixers": 0.55, "titans": 0.2}


@dataclass
class LayersConfig:
    """Sizes, lengths, caps and budget of a ``layers`` run (defaults: the H200 run)."""

    dim: int = 512
    heads: int = 8
    tokens: int = 65_536
    lengths: tuple[int, ...] = (1024, 4096, 16384, 65536)
    dtype: str = "bf16"
    peers: bool = True
    titans_dim: int = 256
    titans_heads: int = 4
    titans_tokens: int = 4096
    titans_lengths: tuple[int, ...] = (1024, 4096, 16384)
    titans_chunks: tuple[int, ...] = (16, 64)
    titans_dtypes: tuple[str, ...] = ("bf16", "fp32")
    lm_vocab: int = 256
    lm_dim: int = 384
    lm_depth: int = 6
    lm_heads: int = 6
    lm_batch: int = 32
    lm_seq: int = 256
    lm_precisions: tuple[str, ...] = ("fp32", "bf16")
    parts: tuple[str, ...] = PARTS
    mixers: tuple[str, ...] = ()  # only the mixers whose name contains one of these (empty: all)
    cap_s: float = 20.0
    budget_s: float = 270.0
    timing: dict = field(default_factory=lambda: dict(warmup=2, repeats=10, min_repeats=3, target_s=1.0))

    @classmethod
    def smoke(cls, **overrides) -> "LayersConfig":
        """Tiny sizes that run on a CPU in seconds (tests, a first check of a new machine)."""
        tiny = dict(dim=16, heads=2, tokens=32, lengths=(8, 16), titans_dim=16, titans_heads=2, titans_tokens=16,
                    titans_lengths=(8, 16), titans_chunks=(4,), titans_dtypes=("fp32",), lm_vocab=32, lm_dim=16,
                    lm_depth=1, lm_heads=2, lm_batch=2, lm_seq=8, dtype="fp32", lm_precisions=("fp32",),
                    cap_s=30.0, budget_s=120.0, timing=dict(warmup=1, repeats=2, min_repeats=1, target_s=0.01))
        tiny.update(overrides)
        return cls(**tiny)

    def __post_init__(self):
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown:
            raise ValueError(f"unknown parts {unknown}; choose from {PARTS}")
        for name, dim, heads in (("", self.dim, self.heads), ("titans_", self.titans_dim, self.titans_heads),
                                 ("lm_", self.lm_dim, self.lm_heads)):
            if dim % heads:
                raise ValueError(f"{name}dim {dim} is not divisible by {name}heads {heads}")
        for d in (self.dtype, *self.titans_dtypes):
            if d not in DTYPES:
                raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {d!r}")


def _fmt_rate(r: float) -> str:
    return f"{r / 1e6:.2f} M tok/s" if r >= 1e6 else f"{r / 1e3:.1f} k tok/s"


def progress_line(row: dict) -> str:
    """One line per measured (or skipped) row."""
    label = row["name"] + "".join(f" {row[k]}" for k in ("dtype", "precision") if row.get(k))
    if row.get("chunk"):
        label += f" chunk {row['chunk']}"
    if "tokens_per_s" in row:
        what = (f"{row['ms']:.1f} ms/step" if row["section"] == "lm" else _fmt_rate(row["tokens_per_s"]) +
                f", {row['ms']:.1f} ms")
        what += (f", {row['peak_GiB']:.2f} GiB" if row.get("peak_GiB") is not None else "") + f", {row['calls']} calls"
    else:
        what = (row.get("error") or row.get("skipped", ""))[:120]
    return f"layers: {row['section']} | {label} | {row['batch']} x {row['length']} | {what} | {row.get('seconds', 0):.1f} s"


def cheapest_first(plan):
    """Yield the plan's entries, each case's lengths in order, the cheapest predicted one next.

    Every case's first entry comes first (in plan order); after that, the case whose next length
    has the lowest predicted per-call time (its last measured ms x T_next / T_last) goes next.
    The caller reports each measured row back with ``send``.

    >>> plan = [("slow", 1, 8, {}), ("fast", 1, 8, {}), ("slow", 1, 16, {}), ("fast", 1, 16, {})]
    >>> gen = cheapest_first(plan)
    >>> order = [next(gen)[0], gen.send({"ms": 100.0})[0], gen.send({"ms": 1.0})[0]]
    >>> order
    ['slow', 'fast', 'fast']
    """
    queues: dict = {}
    for i, entry in enumerate(plan):
        case, _, length, extra = entry
        queues.setdefault((getattr(case, "name", case), tuple(sorted(extra.items()))), []).append((length, i, entry))
    for q in queues.values():
        q.sort(key=lambda item: (item[0], item[1]))
    last: dict = {}

    def predicted(key):
        length, index, _ = queues[key][0]
        if key not in last or not last[key][1]:
            return (0.0, index)
        prev, ms = last[key]
        return (ms * length / prev, index)

    while queues:
        key = min(queues, key=predicted)
        length, _, entry = queues[key].pop(0)
        if not queues[key]:
            del queues[key]
        row = yield entry
        last[key] = (length, (row or {}).get("ms"))


def run_plan(section: str, plan, device: str, clock, cfg: LayersConfig, deadline: Deadline, log: Callable) -> list[dict]:
    """Measure each (case, batch, length, extra) of ``plan``, cheapest predicted first; skip past
    the per-measurement cap or the part's budget."""
    guard, rows = LengthGuard(cfg.cap_s), []
    order = cheapest_first(plan)
    row = None
    while True:
        try:
            case, batch, length, extra = order.send(row) if row is not None else next(order)
        except StopIteration:
            break
        key = (case.name, tuple(sorted(extra.items())))
        row = {"section": section, "name": case.name, "source": case.source, **extra}
        reason = guard.reason(key, length)
        if reason is None and deadline.left() <= 0:
            reason = f"skipped: the {section} part's time budget was spent"
        if reason:
            row.update(batch=batch, length=length, tokens=batch * length, skipped=reason)
        else:
            row.update(measure(case.make, batch, length, device, clock, cap_s=cfg.cap_s, **cfg.timing))
            guard.update(key, length, row)
        row["config"] = dict(case.config)
        rows.append(row)
        log(progress_line(row))
    return rows


def plans(cfg: LayersConfig, device: str) -> tuple[dict, dict]:
    """{part: [(case, batch, length, extra), ...]} in run order, and {peer: why unavailable}."""
    unavailable: dict = {}
    out = {}
    if "mixers" in cfg.parts:
        cases, unavailable = mixer_cases(cfg.dim, cfg.heads, device, DTYPES[cfg.dtype], with_peers=cfg.peers)
        if cfg.mixers:
            cases = [c for c in cases if any(m.lower() in c.name.lower() for m in cfg.mixers)]
        out["mixers"] = [(c, b, t, {"dtype": cfg.dtype}) for b, t in length_schedule(cfg.tokens, cfg.lengths) for c in cases]
    if "titans" in cfg.parts:
        out["titans"] = []
        for dtype in cfg.titans_dtypes:
            for chunk in cfg.titans_chunks:
                cases = titans_cases(cfg.titans_dim, cfg.titans_heads, chunk, device, DTYPES[dtype],
                                     unavailable if cfg.peers else {})
                cases = [c for c in cases if cfg.peers or c.source == "ours"]
                out["titans"] += [(c, b, t, {"dtype": dtype, "chunk": chunk})
                                  for b, t in length_schedule(cfg.titans_tokens, cfg.titans_lengths) for c in cases]
    if "lm" in cfg.parts:
        out["lm"] = [(c, cfg.lm_batch, cfg.lm_seq, {"precision": p}) for p in cfg.lm_precisions
                     for c in lm_cases(cfg.lm_vocab, cfg.lm_dim, cfg.lm_depth, cfg.lm_heads, device, p)]
    return out, unavailable


@contextlib.contextmanager
def run_settings():
    """NaN input checks off (a host sync per layer) and TF32 matmuls on; restored afterwards."""
    import nl_layers

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with nl_layers.finite_checks(False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def say(line: str) -> None:
    print(line, flush=True)


def run_layers(cfg: LayersConfig, device: str = "cuda", clock=None, log: Callable = say) -> dict:
    """Every part of ``cfg.parts`` on ``device``; returns the config, rows and unavailable peers."""
    clock = clock or clock_for(device)
    start = time.perf_counter()
    rows = []
    with run_settings():
        planned, unavailable = plans(cfg, device)
        for name, why in unavailable.items():
            log(f"layers: peer {name} unavailable: {why}")
        log(f"layers: {sum(len(p) for p in planned.values())} measurements planned over {list(planned)}; "
            f"budget {cfg.budget_s:.0f} s, cap {cfg.cap_s:.0f} s per measurement")
        deadline = Deadline(cfg.budget_s)
        total = sum(SHARES[p] for p in planned) or 1.0
        for part in [p for p in PARTS if p in planned]:
            deadline.start_section(SHARES[part] / total)
            rows += run_plan(part, planned[part], device, clock, cfg, deadline, log)
    return {"config": asdict(cfg), "rows": rows, "unavailable": unavailable, "clock": clock.name,
            "tf32": True, "finite_checks": False, "seconds": time.perf_counter() - start}
