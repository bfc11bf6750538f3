"""Eager against CUDA-graphed training steps of the language models (GPU).

For each LM (dim 384, depth 6, 4 heads, batch 32 x 256, fp32 with TF32 matmuls), three copies of
one model (same initial weights), rounds interleaved in one process:

* ``eager``: the step as users write it (fused AdamW, float lr, the model's token check);
* ``loss``: the same loop with ``nl_layers.graphed_loss`` (forward and backward replayed as graphs,
  the optimizer and everything after ``backward`` eager: what any optimizer gets);
* ``step``: ``nl_layers.graphed_step`` (the whole step one graph: AdamW fused with
  ``capturable=True`` and a tensor lr).

Each mode checks the token range on each call (one synchronisation, as eager). Every "x base" ratio
is to the first model's (TransformerLM's) step in the same mode and run. A fresh batch is copied
in before every replay.
A model with slow levels (``--models "HopeLM(cms_periods=(1, 4, 16))"``: HOPE's CMS at periods 1,
4 and 16) steps them by ``deepopt.lightning.PeriodicGradients`` eagerly and by ``graphed_step``'s
``periods`` (one graph per set of levels stepping together) in the graphed step.

Usage: ``python -m benchmarks.layers.lm_graphed [--repeat 20] [--rounds 3] [--out DIR]``.

Example (the table on made-up numbers):
    >>> rows = {"T": {"eager": 10.0, "loss": 6.0, "step": 5.0}, "A": {"eager": 30.0, "loss": 13.0, "step": 12.0}}
    >>> print(table(rows, "T")[-1])
    | A | 30.0 | 13.0 | 12.0 | 3.00x | 2.17x | 2.40x |
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

MODES = ("eager", "loss", "step")
HEADS = {"eager": "eager", "loss": "graphed loss", "step": "graphed step"}


def table(rows: dict, base: str) -> list[str]:
    """ms per mode, then each mode's ratio to the ``base`` model's in the same mode."""
    lines = ["| model | " + " | ".join(f"{HEADS[m]} ms" for m in MODES) + " | "
             + " | ".join(f"{HEADS[m]} x base" for m in MODES) + " |", "|---" * (1 + 2 * len(MODES)) + "|"]
    for name, t in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{t[m]:.1f}" for m in MODES) + " | "
                     + " | ".join(f"{t[m] / rows[base][m]:.2f}x" for m in MODES) + " |")
    return lines


def steps(build, vocab: int, batch: int, seq: int, device: str = "cuda") -> dict:
    """mode -> step of its own copy of one model (same initial weights; the step's ``model``
    attribute), each fed a fresh random batch from a pool of three (on a CPU both graphed modes are
    their eager fallbacks: a check)."""
    import nl_layers

    pool = [torch.randint(0, vocab, (batch, seq + 1), device=device) for _ in range(3)]
    turn = [0]

    def next_batch():
        turn[0] += 1
        return pool[turn[0] % 3]

    models = {}
    for m in MODES:
        torch.manual_seed(0)
        models[m] = build().to(device)
    levels = models["step"].level_spec() if hasattr(models["step"], "level_spec") else {}
    periods = levels if any(c > 1 for c in levels.values()) else None

    def loop(model, loss_of):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device == "cuda")
        periodic = None
        if periods:
            from deepopt.lightning import PeriodicGradients

            periodic = PeriodicGradients(model.named_parameters(), levels)

        def step():
            opt.zero_grad(set_to_none=True)
            loss_of(next_batch()).backward()
            if periodic is not None:
                periodic.before_step()
            opt.step()

        return step

    cuda = device == "cuda"
    gopt = torch.optim.AdamW(models["step"].parameters(), lr=torch.tensor(1e-3, device=device), capturable=cuda,
                             fused=cuda)
    replay = nl_layers.graphed_step(models["step"], gopt, pool[0], periods=periods)
    out = {"eager": loop(models["eager"], models["eager"].loss),
           "loss": loop(models["loss"], nl_layers.graphed_loss(models["loss"], pool[0])),
           "step": lambda: replay(next_batch())}
    for m, fn in out.items():
        fn.model = models[m]  # (for checks)
    return out


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
        pair = steps(builders[name], 256, 32, 256)
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
