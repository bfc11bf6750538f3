"""``python -m benchmarks run --suite layers``: options -> :class:`~.run.LayersConfig`, run, write.

Writes ``results.json`` (every row, the config, machine and versions), ``results.md`` (the tables)
and ``layers.png`` (tokens/s against T) to the run folder, then prints the summary table and the
folder.

Example:
    >>> from benchmarks.cli import parser
    >>> args = parser().parse_args(["run", "--suite", "layers", "--lengths", "1024", "4096", "--parts", "mixers"])
    >>> cfg = config_from_args(args)
    >>> cfg.lengths, cfg.parts, cfg.tokens
    ((1024, 4096), ('mixers',), 65536)
"""

from __future__ import annotations

import os
import time

from ..environment import describe
from ..report import print_table, write_json
from .report import layers_markdown, plot_layers, summary
from .run import LayersConfig, run_layers

OPTIONS = {"lengths": "lengths", "tokens": "tokens", "dim": "dim", "heads": "heads", "parts": "parts", "mixers": "mixers",
           "cap_seconds": "cap_s", "budget_seconds": "budget_s"}


def config_from_args(args) -> LayersConfig:
    """The default (or ``--smoke``) config with the command line's overrides."""
    overrides = {}
    for option, key in OPTIONS.items():
        value = getattr(args, option, None)
        if value is not None:
            overrides[key] = tuple(value) if isinstance(value, list) else value
    if getattr(args, "no_peers", False):
        overrides["peers"] = False
    try:
        return LayersConfig.smoke(**overrides) if getattr(args, "smoke", False) else LayersConfig(**overrides)
    except ValueError as err:
        raise SystemExit(str(err)) from err


def write_outputs(result: dict, out_dir: str, plots_too: bool = True) -> list[str]:
    """results.json, results.md and (unless ``plots_too`` is False) layers.png; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")]
    write_json(result, paths[0])
    made = []
    if plots_too:
        try:
            made.append(plot_layers(result, os.path.join(out_dir, "layers.png")))
        except Exception as err:  # e.g. no matplotlib on the GPU machine: the numbers matter more
            print(f"layers: no plot ({type(err).__name__}: {err})", flush=True)
    with open(paths[1], "w", encoding="utf-8") as fh:
        fh.write(layers_markdown(result, made))
    return paths + made


def run_layers_suite(args, out_dir: str) -> dict:
    start = time.time()
    cfg = config_from_args(args)
    print(f"layers: writing to {os.path.abspath(out_dir)}", flush=True)
    result = run_layers(cfg, device=args.device)
    result.update(describe([], command=args.command_line, device=args.device), suite="layers",
                  wall_seconds=time.time() - start)
    paths = write_outputs(result, out_dir, plots_too=not args.no_plots)
    print_table("layers: tokens/s forward + backward; LM ms per step (x TransformerLM)", *summary(result))
    print(f"layers: wrote {', '.join(os.path.basename(p) for p in paths)}", flush=True)
    return result


__all__ = ["config_from_args", "run_layers_suite", "write_outputs"]
