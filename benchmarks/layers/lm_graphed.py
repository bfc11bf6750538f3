"""Eager against ``nl_layers.graphed_step`` for the language models' training step (GPU).

For each LM (dim 384, depth 6, 4 heads, batch 32 x 256, fp32 with TF32 matmuls): the eager step
as users write it (fused AdamW, float lr, the model's token check) and the same step through
``nl_layers.graphed_step`` (AdamW fused with ``capturable=True`` and a tensor lr, the token check on each
call: one synchronisation, as eager), rounds interleaved in one process; every ratio is to
TransformerLM's eager step from the same run. A fresh batch is copied in before every replay.
A model with slow levels (``--models "HopeLM(cms_periods=(1, 4, 16))"``: HOPE's CMS at periods 1,
4 and 16) steps them by ``deepopt.lightning.PeriodicGradients`` eagerly and by ``graphed_step``'s
``periods`` (one graph per set of levels stepping together) in the graphed step.

Usage: ``python -m benchmarks.layers.lm_graphed [--repeat 20] [--rounds 3] [--out DIR]``.

Example (the table on made-up numbers):
    >>> print(table({"T": {"eager": 10.0, "graphed": 5.0}, "A": {"eager": 30.0, "graphed": 12.0}}, "T")[-1])
    | A | 30.0 | 12.0 | 2.50x | 3.00x | 1.20x |
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from ..outdir import announce, run_dir
from .lm_steps import lm_builders
from .timing import clock_for, time_calls

MODES = ("eager", "graphed")


def table(rows: dict, base: str) -> list[str]:
    lines = ["| model | eager ms | graphed ms | eager / graphed | eager x base eager | graphed x base eager |",
             "|---|---|---|---|---|---|"]
    for name, t in rows.items():
        b = rows[base]["eager"]
        lines.append(f"| {name} | {t['eager']:.1f} | {t['graphed']:.1f} | {t['eager'] / t['graphed']:.2f}x"
                     f" | {t['eager'] / b:.2f}x | {t['graphed'] / b:.2f}x |")
    return lines


def steps(build, vocab: int, batch: int, seq: int):
    """(eager step, graphed step) of two copies of one model (same initial weights), each fed a
    fresh random batch from a pool of three."""
    import nl_layers

    pool = [torch.randint(0, vocab, (batch, seq + 1), device="cuda") for _ in range(3)]
    turn = [0]

    def next_batch():
        turn[0] += 1
        return pool[turn[0] % 3]

    torch.manual_seed(0)
    eager_model = build().cuda()
    torch.manual_seed(0)
    graph_model = build().cuda()
    opt = torch.optim.AdamW(eager_model.parameters(), lr=1e-3, fused=True)
    gopt = torch.optim.AdamW(graph_model.parameters(), lr=torch.tensor(1e-3, device="cuda"), capturable=True,
                             fused=True)
    levels = graph_model.level_spec() if hasattr(graph_model, "level_spec") else {}
    periods = levels if any(c > 1 for c in levels.values()) else None
    periodic = None
    if periods:
        from deepopt.lightning import PeriodicGradients

        periodic = PeriodicGradients(eager_model.named_parameters(), levels)

    def eager():
        opt.zero_grad(set_to_none=True)
        eager_model.loss(next_batch()).backward()
        if periodic is not None:
            periodic.before_step()
        opt.step()

    replay = nl_layers.graphed_step(graph_model, gopt, pool[0], periods=periods)
    return eager, lambda: replay(next_batch())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["TransformerLM", "TitansLM", "HopeLM()"])
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", help="output folder (default: a fresh ./runs/lm_graphed-<time>/)")
    a = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    builders = lm_builders(256, 384, 6, 4)
    import nl_layers

    builders["HopeLM(cms_periods=(1, 4, 16))"] = lambda: nl_layers.HopeLM(256, 384, 6, heads=4, cms_periods=(1, 4, 16))
    clock = clock_for("cuda")
    rows = {}
    for name in a.models:
        pair = dict(zip(MODES, steps(builders[name], 256, 32, 256)))
        times = {m: [] for m in MODES}
        for _ in range(a.rounds):
            for m in MODES:
                times[m].append(time_calls(pair[m], clock, warmup=2, repeats=a.repeat, target_s=1e9).ms)
        rows[name] = {m: statistics.median(t) for m, t in times.items()}
        print(name, {m: round(v, 1) for m, v in rows[name].items()}, flush=True)
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, AdamW step, ms (median of {a.rounds} "
             f"rounds of {a.repeat})", ""] + table(rows, a.models[0])
    print("\n".join(lines))
    out = Path(run_dir("lm_graphed", a.out))
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_graphed.json").write_text(json.dumps(rows, indent=1))
    (out / "lm_graphed.md").write_text("\n".join(lines) + "\n")
    announce(str(out))
    return rows


if __name__ == "__main__":
    main()
