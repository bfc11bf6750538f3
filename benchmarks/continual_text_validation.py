"""A CPU text validation sequence for ``deepopt.continual.Recipe``: which setting keeps plasticity on text?

The GPU ``continual_levels`` suite's text sequence (``shakespeare_genres``, raw Markdown, a
``nl_layers.TransformerLM`` d=192 x 4, comedies -> histories -> tragedies, 400 steps per task, seeds
0-2) is a *test* sequence: the recipe's one setting must not be chosen on it. This module runs the
same sequence class (:class:`benchmarks.continual_tasks.ShakespeareGenres`) and the same training
loop (:func:`benchmarks.experiments.continual_levels.run`: AdamW lr 3e-3, weight decay 0.01, the
recipe's AdamW the same) on a *validation* twin sized for one CPU thread:

- the genres in another order, tragedies -> comedies -> histories;
- each genre cut to its first ``MAX_CHARS`` (600,000) characters, so the held-out windows (the last
  10 % of the cut) lie inside the test's *training* text (every genre has more than 890,000), never
  in the test's held-out windows; with this cut the defaults fall behind fine-tuning's average as on
  the GPU (with 200,000, where 300 steps read each genre's text 1.7 times, fine-tuning forgets more
  and the defaults come out ahead);
- seeds 100, 101 (the test's are 0-2); a smaller model (d=64 x 2, 4 heads), context 64, batch 16,
  300 steps per task.

Metrics (bits per character, lower is better; :mod:`benchmarks.metrics`): average final bpc over the
tasks after the last one, BWT (negated for bpc, so negative = forgetting) and the learning bpc (the
mean of R[i][i], each task right after training it: the plasticity). A setting is ``finetune``,
``ewc`` or ``recipe`` with ``key=value`` overrides of ``deepopt.continual.DEFAULTS``, e.g.
``recipe:damping=0,distill=0``; ``--grid`` adds the grid damping {0, 0.3, 1, 3} x distill {0, 0.1} x
strength {0.01, 0.03}; ``--digits-check`` runs the settings on the digits validation sequences of
:mod:`benchmarks.continual_recipe` instead. Results and the diagnosis (the importance-weighted pull,
``strength``, is what costs plasticity on text): ``benchmarks/results/continual_text_validation``.
``--mnist1d-check`` runs them on the validation twin of permuted MNIST-1D (``val_permuted_mnist1d``,
other permutations than the test's). ``si[:c=v]`` and ``lwf[:alpha=v]`` run SI and LwF (the
``continual_levels`` suite's ``si`` and ``lwf`` methods; without a value at the digits choices c 0.1
and alpha 1.0) on the text sequence and in the checks alike; ``--baselines`` adds their text grids
(SI c {0.01, 0.1, 1, 10}, LwF alpha {0.25, 1, 4}), which chose the ``continual_levels`` suite's text
knobs.

    OMP_NUM_THREADS=1 python -m benchmarks.continual_text_validation --settings finetune recipe \\
        recipe:damping=0 --seeds 100 101      # ./runs/continual_text_validation-<time>/

Example (tiny sizes, seconds):
    >>> parse_setting("recipe:damping=0.3,distill=0")
    ('recipe', {'damping': 0.3, 'distill': 0.0})
    >>> out = validate(["finetune", "recipe:damping=0"], seeds=[100], sizes=SMOKE, log=None)
    >>> [row["setting"] for row in out["rows"]], len(out["rows"][0]["runs"][0]["matrix"])
    (['finetune', 'recipe:damping=0'], 3)
    >>> out["rows"][1]["learning_bpc"]["mean"] > 0
    True
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import torch

from deepopt.continual import DEFAULTS

from .experiments.continual_levels import _TEXT_COMMON, run
from .metrics import average_final, backward_transfer
from .outdir import add_arguments as add_out_arguments, run_dir, save

NAME = "continual_text_validation"
GENRES = ("tragedies", "comedies", "histories")  # the test's order is comedies, histories, tragedies
MAX_CHARS = 600_000  # the first runs used 200_000 (see the module doc)
VAL_SEEDS = (100, 101)
SIZES: dict[str, Any] = {"dim": 64, "depth": 2, "heads": 4, "seq_len": 64, "batch": 16, "eval_windows": 32,
                         "steps_per_task": 300, "max_chars": MAX_CHARS, "curve_points": 1}
SMOKE: dict[str, Any] = {"dim": 16, "depth": 1, "heads": 2, "seq_len": 16, "batch": 4, "eval_windows": 4,
                         "steps_per_task": 3, "max_chars": 20_000, "curve_points": 1}
GRID = [f"recipe:strength={s},distill={d},damping={k}"
        for s, d, k in itertools.product((0.01, 0.03), (0.0, 0.1), (0.0, 0.3, 1.0, 3.0))]
BASELINE_GRID = [f"si:c={c}" for c in (0.01, 0.1, 1.0, 10.0)] + [f"lwf:alpha={a}" for a in (0.25, 1.0, 4.0)]


#: the knob each baseline takes in a setting (``si:c=1``, ``lwf:alpha=0.5``) and its value when absent
#: (the choices of :mod:`benchmarks.continual_recipe` on its digits validation sequences)
BASELINE_KNOBS = {"si": ("c", 0.1), "lwf": ("alpha", 1.0)}


def parse_setting(text: str) -> tuple[str, dict[str, Any]]:
    """``"finetune"``, ``"ewc"``, ``"si[:c=v]"``, ``"lwf[:alpha=v]"``, ``"recipe"`` or
    ``"recipe:key=value,..."`` -> (method, overrides)."""
    method, _, rest = text.partition(":")
    if method not in ("finetune", "ewc", "si", "lwf", "recipe"):
        raise ValueError(f"a setting is finetune, ewc, si[:c=v], lwf[:alpha=v] or recipe[:key=value,...], got {text!r}")
    knobs: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"expected key=value in {text!r}, got {item!r}")
        try:
            knobs[key] = float(value)
        except ValueError:
            knobs[key] = value  # e.g. importance=path, coupling=decoupled
    if method in BASELINE_KNOBS:
        key, default = BASELINE_KNOBS[method]
        if set(knobs) - {key}:
            raise ValueError(f"{method} takes only {key}=value, got {text!r}")
        return method, {key: float(knobs.get(key, default))}
    if knobs and method != "recipe":
        raise ValueError(f"only the recipe, si and lwf take key=value overrides, got {text!r}")
    return method, knobs


def _spread(values: Sequence[float]) -> dict[str, float | None]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "per_seed": list(values)}


def one_run(setting: str, seed: int, sizes: dict[str, Any] | None = None) -> dict:
    """One (setting, seed) through the validation sequence with ``continual_levels.run``."""
    method, knobs = parse_setting(setting)
    baseline = {f"{method}_{k}": v for k, v in knobs.items()} if method in BASELINE_KNOBS else {}
    params = {**_TEXT_COMMON, **(sizes or SIZES), "sequence": "shakespeare_genres", "genres": list(GENRES),
              "method": method, "seed": seed, "max_seconds": None,
              "recipe_setting": (knobs or None) if method == "recipe" else None, **baseline}
    res = run(params, "cpu")
    m = res["matrix"]
    return {"seed": seed, "matrix": m, "untrained": res["untrained"], "average_final": average_final(m),
            "bwt": backward_transfer(m, higher_is_better=False),
            "learning_bpc": statistics.fmean(m[i][i] for i in range(len(m))),
            "recipe_knobs": res["recipe_knobs"], "seconds": res["seconds"]}


def validate(settings: Sequence[str], seeds: Sequence[int] = VAL_SEEDS, sizes: dict[str, Any] | None = None,
             log: Callable[[str], None] | None = print) -> dict:
    """Every setting on every seed; per setting the spread of average final bpc, BWT, learning bpc."""
    rows = []
    for setting in settings:
        runs = [one_run(setting, s, sizes) for s in seeds]
        row = {"setting": setting, "runs": runs,
               **{k: _spread([r[k] for r in runs]) for k in ("average_final", "bwt", "learning_bpc")},
               "learning_bpc_per_task": [statistics.fmean(r["matrix"][i][i] for r in runs)
                                         for i in range(len(runs[0]["matrix"]))],
               "seconds_per_run": statistics.fmean(r["seconds"] for r in runs)}
        if log:
            log(f"{setting}: avg {row['average_final']['mean']:.3f} bwt {row['bwt']['mean']:+.3f} "
                f"learning {row['learning_bpc']['mean']:.3f} ({row['seconds_per_run']:.0f} s/run)")
        rows.append(row)
    return {"rows": rows, "seeds": list(seeds), "sizes": dict(sizes or SIZES), "genres": list(GENRES)}


def digits_check(settings: Sequence[str], seeds: Sequence[int], log: Callable[[str], None] | None = print,
                 sequences: dict | None = None) -> list[dict]:
    """The same settings on the digits validation sequences of :mod:`benchmarks.continual_recipe`
    (``VALIDATION_SEQUENCES``, its ``run`` and ``summarize``: AdamW lr 1e-2, its step counts; ``ewc``
    is its EWC at the chosen lambda 100): per sequence the spread of average accuracy, BWT, learning
    accuracy over ``seeds`` (validation seeds only; no test sequence runs). ``sequences`` (default
    ``VALIDATION_SEQUENCES``) may name other validation sequences, e.g. ``VAL_MNIST1D_SEQUENCES``;
    ``si`` is its SI at the chosen c 0.1."""
    from . import continual_recipe as cr
    from .continual_sequences import TEST_SEQUENCES, VALIDATION_SEQUENCES

    sequences = VALIDATION_SEQUENCES if sequences is None else sequences
    if set(sequences) & set(TEST_SEQUENCES):
        raise ValueError(f"validation sequences only, got {sorted(set(sequences) & set(TEST_SEQUENCES))}")

    out = []
    for setting in settings:
        method, knobs = parse_setting(setting)
        name, knobs = {"finetune": ("finetune", {}), "ewc": ("EWC", {"lam": 100.0}), "si": ("SI", knobs),
                       "lwf": ("LwF", knobs), "recipe": ("recipe", knobs)}[method]
        row = {"setting": setting, "method": name, "knobs": knobs, "per_sequence": {}}
        for seq_name, cls in sequences.items():
            runs = [cr.run(cls(), name, knobs, s) for s in seeds]
            summary = cr.summarize(runs)
            row["per_sequence"][seq_name] = {k: summary[k] for k in ("average", "bwt", "learning_accuracy", "errors")}
            row["per_sequence"][seq_name]["average_per_seed"] = [
                None if r["matrix"] is None else statistics.fmean(r["matrix"][-1]) for r in runs]
        if log:
            log(f"check {setting}: " + " ".join(
                f"{k}: acc {v['average']['mean']:.3f} bwt {v['bwt']['mean']:+.3f} la {v['learning_accuracy']['mean']:.3f}"
                for k, v in row["per_sequence"].items()))
        out.append(row)
    return out


def digits_markdown(rows: list[dict], command: str, seeds: Sequence[int],
                    title: str = "the digits validation sequences") -> str:
    """Table of :func:`digits_check` rows (target: avg >= fine-tuning's, |BWT| <= 0.5 x fine-tuning's)."""
    ft = next((r for r in rows if r["setting"] == "finetune"), None)
    lines = [f"# The same settings on {title}", "", f"Command: `{command}`", "",
             f"Seeds {list(seeds)}; mean +- std; avg = average accuracy after the last task, BWT (negative = "
             "forgetting), LA = learning accuracy.", "",
             "| setting | sequence | avg | BWT | LA | target met |", "|---|---|---|---|---|---|"]
    for r in rows:
        for seq_name, v in r["per_sequence"].items():
            met = "-"
            if ft is not None and r is not ft:
                f = ft["per_sequence"][seq_name]
                met = "yes" if (v["average"]["mean"] >= f["average"]["mean"]
                                and abs(v["bwt"]["mean"]) <= 0.5 * abs(f["bwt"]["mean"])) else "no"
            pm = lambda s: f"{s['mean']:.3f} +- {s['std']:.3f}"  # noqa: E731
            lines.append(f"| {r['setting']} | {seq_name} | {pm(v['average'])} | {pm(v['bwt'])} | "
                         f"{pm(v['learning_accuracy'])} | {met} |")
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    """The table: one row per setting, against fine-tuning's when it ran (the target: average bpc <=
    fine-tuning's with |BWT| <= 0.5 x fine-tuning's)."""
    ft = next((r for r in result["rows"] if r["setting"] == "finetune"), None)
    f = lambda s, fmt="{:.3f}": fmt.format(s["mean"]) + ("" if s["std"] is None else f" +- {s['std']:.3f}")  # noqa: E731
    lines = [f"# Recipe settings on the CPU text validation sequence ({' -> '.join(result['genres'])})", "",
             f"Command: `{result.get('command', '')}`", "",
             f"Seeds {result['seeds']}; sizes {json.dumps(result['sizes'])}; bpc, lower is better; BWT negative = "
             "forgetting; learning bpc = mean of R[i][i] (each task right after training it). Mean +- std over seeds.",
             "", "| setting | avg final bpc | BWT | learning bpc | learning bpc per task | target met | s/run |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        met = "-"
        if ft is not None and r is not ft:
            ok = (r["average_final"]["mean"] <= ft["average_final"]["mean"]
                  and abs(r["bwt"]["mean"]) <= 0.5 * abs(ft["bwt"]["mean"]))
            met = "yes" if ok else "no"
        per = " / ".join(f"{v:.3f}" for v in r["learning_bpc_per_task"])
        name = r["setting"] + (" (= defaults)" if r["runs"][0]["recipe_knobs"] == DEFAULTS else "")
        lines.append(f"| {name} | {f(r['average_final'])} | {f(r['bwt'], '{:+.3f}')} | "
                     f"{f(r['learning_bpc'])} | {per} | {met} | {r['seconds_per_run']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_out_arguments(parser, NAME)
    parser.add_argument("--settings", nargs="+", default=["finetune", "recipe"],
                        help="finetune, ewc, si[:c=v], lwf[:alpha=v], recipe or recipe:key=value,... "
                             "(default: finetune recipe)")
    parser.add_argument("--grid", action="store_true", help="also the grid damping x distill x strength (GRID)")
    parser.add_argument("--baselines", action="store_true", help="also the SI and LwF grids (BASELINE_GRID)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(VAL_SEEDS))
    parser.add_argument("--steps", type=int, help=f"steps per task (default {SIZES['steps_per_task']})")
    parser.add_argument("--size", nargs="+", default=[], metavar="KEY=INT",
                        help=f"override sizes, e.g. dim=96 max_chars=600000 (keys: {', '.join(SIZES)})")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (SMOKE), seconds")
    parser.add_argument("--digits-check", action="store_true",
                        help="run the settings on the digits validation sequences of benchmarks.continual_recipe "
                             "instead (digits_check.json / digits_check.md)")
    parser.add_argument("--mnist1d-check", action="store_true",
                        help="run the settings on the validation twin of permuted MNIST-1D (val_permuted_mnist1d) "
                             "instead (mnist1d_check.json / mnist1d_check.md)")
    args = parser.parse_args(argv)
    out_dir = run_dir(NAME, args.out, args.update_results)
    torch.set_num_threads(args.threads)
    shown = argv if argv is not None else sys.argv[1:]
    command = f"OMP_NUM_THREADS={args.threads} python -m benchmarks.{NAME} " + " ".join(shown)
    if args.digits_check or args.mnist1d_check:
        from .continual_sequences import VAL_MNIST1D_SEQUENCES, VALIDATION_SEQUENCES

        if args.mnist1d_check and not VAL_MNIST1D_SEQUENCES:
            parser.error("--mnist1d-check needs the mnist1d package")
        key, seqs, title = (("mnist1d_check", VAL_MNIST1D_SEQUENCES, "the permuted MNIST-1D validation sequence")
                            if args.mnist1d_check else
                            ("digits_check", VALIDATION_SEQUENCES, "the digits validation sequences"))
        t0 = time.perf_counter()
        rows = digits_check(list(dict.fromkeys(list(args.settings) + (GRID if args.grid else [])
                                + (BASELINE_GRID if args.baselines else []))), args.seeds,
                            log=lambda s: print(s, flush=True), sequences=seqs)
        save(out_dir, key, {"command": command, "seeds": args.seeds, "rows": rows,
                            "seconds": time.perf_counter() - t0,
                            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
             digits_markdown(rows, command, args.seeds, title))
        return {key: rows}
    sizes = dict(SMOKE if args.smoke else SIZES)
    if args.steps:
        sizes["steps_per_task"] = args.steps
    for item in args.size:
        key, _, value = item.partition("=")
        if key not in SIZES or not value:
            parser.error(f"--size takes KEY=INT with KEY one of {list(SIZES)}, got {item!r}")
        sizes[key] = int(value)
    settings = list(dict.fromkeys(list(args.settings) + (GRID if args.grid else [])
                                + (BASELINE_GRID if args.baselines else [])))
    t0 = time.perf_counter()
    result = validate(settings, args.seeds, sizes, log=lambda s: print(s, flush=True))
    result.update({"command": command,
                   "torch": torch.__version__, "threads": args.threads, "seconds": time.perf_counter() - t0,
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    save(out_dir, "results", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
