"""Every suite of ``python -m benchmarks run --suite NAME``: what it runs, its smoke mode, where it writes.

| suite | kind | committed results |
|---|---|---|
| quick, quality | optimizers on tasks, steps to AdamW's target | results/quick, results/quality |
| continual | optimizers (+ slow levels) on task sequences | results/continual |
| speed, layers | timing: optimizer steps (GPU; CPU into speed_cpu); nl_layers mixers and LMs (GPU) | results/speed, results/speed_cpu, results/layers |
| lm, lm_optimizers, continual_levels, recall | pool suites (jobs over GPUs, records.jsonl) | results/evidence |
| lm_defaults | every LM at its default arguments (a pool suite of its own) | results/lm_defaults |
| lr_transfer | each optimizer's best rate relative to AdamW's | results/lr_transfer |
| continual_recipe | deepopt.continual.Recipe against fine-tuning, EWC, SI, LwF, replay | results/continual_recipe |
| pretrained | a shipped DeepMomentum memory, untuned, against AdamW and Muon on held-out task families | results/pretrained |

``memory`` is the old name of ``layers``. Every suite writes to a fresh ``./runs/<suite>-<time>/``
unless ``--out`` or ``--update-results`` (the committed folder above) and prints the folder at the
end. ``--smoke`` runs any suite at tiny sizes on the CPU in seconds (the tests run every one).

Example:
    >>> SUITES["quick"].tasks
    ('digits_mlp', 'quadratic_illcond', 'char_transformer')
    >>> SUITES["continual_levels"].kind, SUITES["continual_levels"].results
    ('pool', 'evidence')
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .continual_tasks import SEQUENCES
from .outdir import announce, reference_dir, run_dir
from .suite_runs import DEFAULT_THREADS, check_cuda, run_continual_suite, run_quality_suite
from .tasks import TASKS


@dataclass(frozen=True)
class Suite:
    """A suite: how it runs (``kind``), its tasks, default seeds, step overrides, committed folder."""

    name: str
    description: str
    kind: str
    tasks: tuple[str, ...] = ()
    seeds: int = 1
    steps: dict[str, tuple[int, int]] = field(default_factory=dict)  # task -> (steps, eval_every)
    needs_cuda: bool = False
    results: str = ""  # the committed folder under benchmarks/results/ (default: the suite's name)


SUITES = {s.name: s for s in (
    Suite("quick", "each optimizer on 3 small tasks, 1 seed, under 5 minutes on a 2-core CPU", "quality",
          ("digits_mlp", "quadratic_illcond", "char_transformer"), seeds=1,
          steps={"digits_mlp": (200, 10), "quadratic_illcond": (200, 10), "char_transformer": (60, 10)}),
    Suite("quality", "every task, learning-rate sweep, >= 3 seeds, steps to AdamW's target", "quality",
          tuple(n for n, t in TASKS.items() if "slow" not in t.tags), seeds=3),
    Suite("continual", "optimizers (+ slow levels) on task sequences: average, backward and forward transfer",
          "continual", tuple(SEQUENCES), seeds=3),
    Suite("speed", "optimizer step time vs torch's: a GPT-like 1.3B list, fp32 and bf16 (cuda); "
          "8 matrices 256 x 1024, fp32 (cpu, committed under results/speed_cpu)", "speed", ("gpt_1.3b",)),
    Suite("layers", "GPU: nl_layers mixers fwd+bwd tokens/s and peak memory at T 1K-64K vs SDPA, fla, "
          "titans-pytorch; LM step times vs TransformerLM", "layers", ("seq_1k_64k",), needs_cuda=True),
    Suite("lm", "GPUs: Transformer++ / Titans / HOPE / HOPE-attention on Shakespeare, lr sweep then seeds", "pool",
          results="evidence"),
    Suite("lm_optimizers", "GPUs: AdamW, Muon, MuonMemory, M3, DeltaMomentum, DeepMomentum on one LM", "pool",
          results="evidence"),
    Suite("continual_levels", "GPUs: fine-tuning vs multi-timescale levels vs nested CMS vs EWC vs replay vs recipe",
          "pool", results="evidence"),
    Suite("recall", "GPUs: multi-query associative recall by memory rule and width", "pool", results="evidence"),
    Suite("lm_defaults", "GPUs: every nl_layers LM at its default arguments, 1000 AdamW steps x 3 seeds",
          "lm_defaults", seeds=3),
    Suite("lr_transfer", "each optimizer's best learning rate relative to AdamW's, on two small MLPs",
          "lr_transfer", seeds=2),
    Suite("continual_recipe", "deepopt.continual.Recipe vs fine-tuning, EWC, SI, LwF, replay on digit sequences "
          "(knobs chosen on validation sequences), 5 seeds", "continual_recipe", seeds=5),
    Suite("pretrained", "a shipped DeepMomentum memory, untuned, against AdamW and Muon (default and tuned rates) "
          "on 5 held-out task families, 3 seeds, and at 10x their horizon", "pretrained", seeds=3),
)}
DELEGATED = ("lm_defaults", "lr_transfer", "continual_recipe", "pretrained")  # suites run by their own module's command line
ALIASES = {"memory": "layers"}  # old name -> suite, kept for one release
SMOKE_OPTIMIZERS = ["AdamW", "SGD", "MuonMemory"]


def resolve(names: list[str]) -> list[Suite]:
    """The suites called ``names`` (old names mapped, with a note); several only if all are pool suites."""
    out = []
    for name in names:
        if name in ALIASES:
            print(f"--suite {name} is now --suite {ALIASES[name]} (the old name goes in the next release)", flush=True)
            name = ALIASES[name]
        out.append(SUITES[name])
    if len(out) > 1 and any(s.kind != "pool" for s in out):
        raise ValueError("several --suite names run together only for pool suites "
                         f"({', '.join(n for n, s in SUITES.items() if s.kind == 'pool')})")
    return out


def apply_smoke(suite: Suite, args) -> None:
    """``--smoke``: tiny budgets on the CPU (only where the command line left a choice open)."""
    if suite.kind in ("quality", "continual"):
        args.steps = args.steps or (3 if suite.kind == "quality" else 2)
        args.seeds, args.factors = args.seeds or 1, args.factors or [1.0]
        args.optimizers = args.optimizers or SMOKE_OPTIMIZERS
    elif suite.kind == "speed":
        args.optimizers = args.optimizers or ["AdamW(foreach)", "Muon", "MuonMemory"]
    elif suite.kind in ("pool", "lm_defaults"):
        args.devices = "cpu" if args.devices == "auto" else args.devices
        args.seeds = args.seeds or 1


def output_dir(suites: Suite | list[Suite], out: str | None = None, update: bool = False) -> str:
    """``--out``; else the committed folder with ``--update-results``; else a fresh ``./runs/<suite>-<time>/``
    (``runs/evidence-<time>/`` for several pool suites)."""
    suites = [suites] if isinstance(suites, Suite) else suites
    if update and not out:
        return reference_dir(suites[0].results or suites[0].name)
    return run_dir(suites[0].name if len(suites) == 1 else "evidence", out, update)


def _delegated_argv(suite: Suite, args, out_dir: str) -> list[str]:
    """The command line of ``python -m benchmarks.<suite>`` for ``lm_defaults`` / ``lr_transfer``."""
    argv = ["--out", out_dir] + (["--update-results"] if args.update_results else [])
    if args.seeds:
        argv += ["--seeds", str(args.seeds)]
    if args.steps:
        argv += ["--steps", str(args.steps)]
    if suite.kind == "lm_defaults":
        argv += ["--devices", args.devices] + (["--smoke"] if args.smoke else []) + (["--no-plots"] if args.no_plots else [])
        argv += [f"--{k}={getattr(args, k)}" for k in ("dim", "heads", "deadline") if getattr(args, k) is not None]
    else:
        argv += ["--threads", str(args.threads)]
        argv += ["--tasks", *args.tasks] if args.tasks else []
        argv += ["--optimizers", *args.optimizers] if args.optimizers else (
            ["--optimizers", *SMOKE_OPTIMIZERS] if args.smoke else [])
        argv += ["--lrs", "1e-3", "1e-2"] if args.smoke and "--lrs" not in args.extra else []
        argv += ["--steps", "3"] if args.smoke and not args.steps else []
    return argv + list(args.extra)


def run_named_suite(args) -> dict | None:
    """Dispatch ``python -m benchmarks run`` (``args`` from :mod:`benchmarks.cli`)."""
    import torch

    suites = resolve(list(args.suite))
    suite = suites[0]
    if args.extra and suite.kind not in DELEGATED:
        raise ValueError(f"unrecognized arguments for --suite {suite.name}: {' '.join(args.extra)}")
    if args.smoke:
        apply_smoke(suite, args)
    if not (args.smoke and args.device == "cpu") and suite.kind not in ("pool", *DELEGATED):
        check_cuda(suite, args.device)
    if suite.name == "speed" and args.device == "cpu":  # CPU timings never over the GPU results
        out_dir = run_dir("speed_cpu", args.out, args.update_results)
    else:
        out_dir = output_dir(suites, args.out, args.update_results)
    torch.set_num_threads(args.threads)
    if suite.kind == "lm_defaults":
        from .lm_defaults.cli import main as lm_defaults_main

        lm_defaults_main(_delegated_argv(suite, args, out_dir))
        return None
    if suite.kind == "lr_transfer":
        from .lr_transfer.cli import main as lr_transfer_main

        lr_transfer_main(_delegated_argv(suite, args, out_dir))
        return None
    if suite.kind == "continual_recipe":
        from .continual_recipe import main as continual_recipe_main

        argv = ["--out", out_dir, "--threads", str(args.threads)] + (["--update-results"] if args.update_results else [])
        argv += (["--smoke"] if args.smoke else []) + (["--seeds", *map(str, range(args.seeds))] if args.seeds else [])
        continual_recipe_main(argv + list(args.extra))
        return None
    if suite.kind == "pretrained":
        from .pretrained.evaluate import main as pretrained_main

        argv = ["--out", out_dir, "--threads", str(args.threads), "--device", args.device or "cpu"]
        argv += (["--update-results"] if args.update_results else []) + (["--smoke"] if args.smoke else []) + (["--seeds", str(args.seeds)] if args.seeds else [])
        argv += (["--steps", str(args.steps)] if args.steps else []) + (["--families", *args.tasks] if args.tasks else [])
        pretrained_main(argv + list(args.extra))
        return None
    os.makedirs(out_dir, exist_ok=True)
    if suite.kind == "quality":
        result = run_quality_suite(suite, args, out_dir)
    elif suite.kind == "continual":
        result = run_continual_suite(suite, args, out_dir)
    elif suite.kind == "speed":
        from .smoke import run_speed

        result = run_speed(args, out_dir)
    elif suite.kind == "layers":
        from .layers.suite import run_layers_suite

        result = run_layers_suite(args, out_dir)
    else:
        from .experiments.run import run_pool_suites

        result = {"records": run_pool_suites([s.name for s in suites], args, out_dir)}
    announce(out_dir)
    return result


__all__ = ["ALIASES", "DEFAULT_THREADS", "SUITES", "Suite", "output_dir", "run_named_suite"]
