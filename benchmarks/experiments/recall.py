"""Suite ``recall``: multi-query associative recall (MQAR) by memory rule and width.

Task: :func:`benchmarks.data.mqar_batch` (``pairs`` key-value pairs, every key queried once more
later; accuracy at the query positions; chance 1/values, or 1/pairs among the sequence's values).
Model: :class:`benchmarks.tasks.recall.RecallModel` (2 blocks of mixer + SwiGLU) with one of the
``MIXERS``. Training: AdamW (betas 0.9/0.98, weight decay 0.1), per-mixer rate (``LR``, or ``lr``
for all), linear warm-up over 10% of the steps then cosine to 10%, clipping at 1, fresh batches
every step, fp32 (TF32 matmuls on CUDA). Accuracy on ``eval_sequences`` fixed held-out sequences.
``compile="graphed_loss"`` (the gpu10x preset's) replays the training loss, forward and backward, as
CUDA graphs (``nl_layers.graphed_loss``; AdamW and the clipping stay eager), reading the query rows
at their positions (:func:`benchmarks.tasks.recall.query_positions`) instead of through the mask,
whose data-dependent shape no graph can hold; the same rows, so on the CPU (eager) the run equals
the default one bit for bit.

Sizing: a job's ``cost`` (expected GPU seconds, to order the queue) comes from ``GPU_STEP`` (20-step
runs on an H200, ``calibrate.sh``) or ``CPU_STEP`` / ``SPEEDUP``. Titans and self-modifying Titans
at the layers' default inner step gave NaN within 20 steps on the H200, so the gpu preset bounds it
at ``memory_max_lr`` = 1e-3. The committed records hold two regimes (stage A: batch 64 x 500 steps,
vocab 512; stage C: the present preset, batch 256 x 1200 steps, vocab 256, lr 3e-3); the report
keeps them in separate tables.

Example:
    >>> [j.name for j in jobs("tiny")]
    ['attention_w32_T32_p4_s0', 'delta_w32_T32_p4_s0']
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..data import mqar_batch, split_vocab
from ..pool import Job
from ..report import markdown_table, write_json
from ..tasks.recall import MIXERS, RecallModel, query_positions

LR = {"attention": 1e-3, "hebbian": 3e-3, "delta": 3e-3, "dgd": 3e-3, "titans": 3e-3, "self_modifying": 3e-3}
GPU_STEP = {"attention": 0.015, "hebbian": 0.03, "delta": 0.03, "dgd": 0.03, "titans": 0.25, "self_modifying": 0.3}
SPEEDUP = {"attention": 60.0, "hebbian": 40.0, "delta": 40.0, "dgd": 40.0, "titans": 35.0, "self_modifying": 35.0}
# measured: 20-step runs of every configuration on an H200 (benchmarks/experiments/calibrate.sh, 2026-11-27)
# took 0.23-0.43 s (attention), 0.45-0.70 s (linear rules), 1.3 s (delta, seq 1024) and 5.0 s (titans w64)
# CPU seconds per training step (1 thread, batch 64, vocab 512), measured by cpu_seconds_per_step:
# {(mixer, width, seq_len): seconds}. Measured on a shared, loaded 2-core CPU (load 2-4), so maybe 2x
# slow; self_modifying w256 and seq 1024 measured at batch 16 x 4 (batch 64 self_modifying w256 needs > 22 GB).
CPU_STEP = {
    ("attention", 64, 256): 0.758, ("attention", 128, 256): 2.00, ("attention", 256, 256): 3.91,
    ("hebbian", 64, 256): 0.624, ("hebbian", 128, 256): 1.86, ("hebbian", 256, 256): 7.18,
    ("delta", 64, 256): 1.21, ("delta", 128, 256): 3.73, ("delta", 256, 256): 10.1,
    ("dgd", 64, 256): 1.03, ("dgd", 128, 256): 2.43, ("dgd", 256, 256): 13.8,
    ("titans", 64, 256): 8.85, ("titans", 128, 256): 12.9, ("titans", 256, 256): 42.8,
    ("self_modifying", 64, 256): 12.3, ("self_modifying", 128, 256): 56.1, ("self_modifying", 256, 256): 65.7,
    ("attention", 128, 1024): 7.85, ("delta", 128, 1024): 11.0,
}

COMPILE = ("none", "graphed_loss")
PRESETS = {
    "tiny": dict(mixers=["attention", "delta"], widths=[32], settings=[[32, 4]], seeds=[0], steps=30, batch=16,
                 vocab=64, eval_sequences=64, evals=3),
    "gpu": dict(mixers=["attention", "hebbian", "delta", "dgd"], widths=[64, 128, 256], settings=[[256, 16]],
                seeds=[0, 1], steps=1200, batch=256, vocab=256, eval_sequences=512, evals=10, lr=3e-3,
                memory_max_lr=1e-3, extra=[dict(settings=[[256, 64]], widths=[128])],
                max_seconds=240),
    # gpu10x: the harder settings (64 pairs in 256 tokens, 128 in 512) for every mixer, the rebuilt
    # Titans memories at their layer defaults (no memory_max_lr), each mixer at its own rate (LR),
    # 3,000 steps of 128 sequences (more sequences than the gpu preset's 1,200 x 256). Not sized on a
    # GPU yet: calibrate with --set steps=20 first; max_seconds caps every run (reported as cut short).
    "gpu10x": dict(mixers=list(MIXERS), widths=[128], settings=[[256, 64], [512, 128]], seeds=[0, 1],
                   steps=3000, batch=128, vocab=512, eval_sequences=512, evals=10, max_seconds=420,
                   compile="graphed_loss"),
}


def _lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 10)
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def _evaluate(model, held_out, chunk: int = 128) -> tuple[float, float]:
    model.eval()
    tokens, targets, mask = held_out
    loss = correct = count = 0.0
    for i in range(0, tokens.shape[0], chunk):
        t, y, m = tokens[i : i + chunk], targets[i : i + chunk], mask[i : i + chunk]
        logits = model(t, m)
        loss += float(F.cross_entropy(logits, y[m], reduction="sum"))
        correct += float((logits.argmax(-1) == y[m]).sum())
        count += int(m.sum())
    model.train()
    return loss / count, correct / count


def run(params: dict, device: str) -> dict:
    """Train one model from scratch on MQAR; returns final held-out accuracy, curves, steps, seconds.

    The layers' NaN input checks are off during the run (restored after): a non-finite training
    loss ends the run as ``diverged`` (its accuracy is then the last evaluation's)."""
    import nl_layers

    with nl_layers.finite_checks(False):
        return _run(params, device)


def _run(params: dict, device: str) -> dict:
    start = time.perf_counter()
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    mixer, width, seq_len, pairs = params["mixer"], int(params["width"]), int(params["seq_len"]), int(params["pairs"])
    steps, batch, seed = int(params["steps"]), int(params["batch"]), int(params["seed"])
    keys, values = split_vocab(int(params["vocab"]))
    max_seconds = params.get("max_seconds")
    lr = float(params.get("lr", LR[mixer]))
    torch.manual_seed(seed)
    model = RecallModel(mixer, width, int(params["vocab"]), memory_max_lr=params.get("memory_max_lr")).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(1_000_003 * seed + 17)
    held_gen = torch.Generator().manual_seed(987_654 + seq_len * 1000 + pairs)
    held_out = tuple(t.to(dev) for t in mqar_batch(int(params["eval_sequences"]), seq_len, pairs, keys, values, held_gen))
    every = max(1, steps // max(1, int(params.get("evals", 10))))
    loss_of, graph_error = None, None
    if params.get("compile", "none") == "graphed_loss":
        loss_of, graph_error = _graphed_loss(model, seq_len, pairs, keys, values, batch, seed, dev)
    elif params.get("compile", "none") != "none":
        raise ValueError(f"compile must be one of {COMPILE}, got {params['compile']!r}")
    curve, train_losses, step, cut_short, diverged = [], [], 0, False, False
    while step < steps:
        if max_seconds is not None and time.perf_counter() - start > float(max_seconds):
            cut_short = True
            break
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        tokens, targets, mask = mqar_batch(batch, seq_len, pairs, keys, values, gen)
        if loss_of is not None:  # the same rows through positions: static shapes, replayed as graphs on CUDA
            loss = loss_of(*(t.to(dev, non_blocking=True) for t in (tokens, targets, query_positions(mask, pairs))))
        else:
            tokens, targets, mask = (t.to(dev, non_blocking=True) for t in (tokens, targets, mask))
            loss = F.cross_entropy(model(tokens, mask), targets[mask])
        if step % 50 == 0 and not math.isfinite(float(loss.detach())):
            diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % every == 0 or step == steps:
            train_losses.append([step, float(loss.detach())])
            eval_loss, acc = _evaluate(model, held_out)
            curve.append([step, eval_loss, acc])
    if not curve or curve[-1][0] != step:
        eval_loss, acc = _evaluate(model, held_out)
        curve.append([step, eval_loss, acc])
    seconds = time.perf_counter() - start
    return {"accuracy": curve[-1][2], "eval_loss": curve[-1][1], "curve": curve, "train_loss": train_losses,
            "steps_done": step, "steps": steps, "cut_short": cut_short, "diverged": diverged, "seconds": seconds,
            "seconds_per_step": seconds / max(1, step), "parameters": n_params, "lr": lr,
            "chance": 1.0 / values, "chance_in_sequence": 1.0 / pairs, "finite": math.isfinite(curve[-1][1]),
            "compile": "graphed_loss" if loss_of is not None and dev.type == "cuda" else "none",
            "graph_error": graph_error}


def _query_loss(model, tokens: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at the query ``positions`` (:func:`benchmarks.tasks.recall.query_positions`)."""
    return F.cross_entropy(model(tokens, positions), targets.gather(1, positions).reshape(-1))


def _graphed_loss(model, seq_len: int, pairs: int, keys: int, values: int, batch: int, seed: int, dev):
    """(``loss_of(tokens, targets, positions)``, None): the training loss with its forward and
    backward replayed as CUDA graphs (``nl_layers.graphed_loss``; the eager loss on the CPU),
    captured on a batch from a generator of its own (the run's batch stream is untouched). A mixer
    that cannot be captured gives (the eager positions loss, the error's text)."""
    import nl_layers

    example = mqar_batch(batch, seq_len, pairs, keys, values, torch.Generator().manual_seed(seed + 4_242))
    example = tuple(t.to(dev) for t in (example[0], example[1], query_positions(example[2], pairs)))
    try:
        return nl_layers.graphed_loss(model, example, _query_loss, check_inputs=False), None
    except RuntimeError as err:  # e.g. an op that synchronises with the host inside the capture
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (lambda *b: _query_loss(model, *b)), f"{type(err).__name__}: {err}"[:500]


def _grid_jobs(cfg: dict, seeds: Sequence[int]) -> list[Job]:
    out = []
    for seq_len, pairs in cfg["settings"]:
        for mixer in cfg["mixers"]:
            for width in cfg["widths"]:
                for seed in seeds:
                    params = {k: cfg[k] for k in ("steps", "batch", "vocab", "eval_sequences", "evals")}
                    params.update(mixer=mixer, width=width, seq_len=seq_len, pairs=pairs, seed=seed)
                    for key in ("max_seconds", "lr", "memory_max_lr", "compile"):
                        if key in cfg:
                            params[key] = cfg[key]
                    per_step = estimated_gpu_step(mixer, width, seq_len, cfg["batch"])
                    name = f"{mixer}_w{width}_T{seq_len}_p{pairs}_s{seed}"
                    out.append(Job("recall", name, params, round(per_step * cfg["steps"] + 2.0, 2)))
    return out


def estimated_gpu_step(mixer: str, width: int, seq_len: int, batch: int) -> float:
    """Expected GPU seconds per step at batch 64 and seq 256 scaled linearly in batch and length:
    ``GPU_STEP`` (from the H200 calibration; CPU_STEP / SPEEDUP for a mixer without a measurement)."""
    per_step = GPU_STEP.get(mixer)
    if per_step is None:
        near = [(abs(math.log(w / width)), s) for (m, w, t), s in CPU_STEP.items() if m == mixer and t == 256]
        per_step = (min(near)[1] if near else 1e-3 * width) / SPEEDUP.get(mixer, 10.0)
    return per_step * (batch / 64) * (seq_len / 256)


def jobs(preset: str, seeds: Sequence[int] | None = None, **overrides) -> list[Job]:
    """The jobs of ``preset`` ("tiny", "gpu" or "gpu10x"); ``overrides`` replace preset entries for every job.

    The gpu preset's ``extra`` entry lists further grids (each a dict of the entries that differ,
    e.g. a longer setting with fewer mixers); an override applies there too, and ``settings=...``
    or ``extra=[]`` drops them.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    cfg = {k: v for k, v in PRESETS[preset].items()}
    unknown = set(overrides) - set(cfg) - {"lr", "max_seconds", "memory_max_lr", "compile"}
    if unknown:
        raise ValueError(f"unknown recall override(s) {sorted(unknown)}; known: {sorted(cfg)} and lr, max_seconds, "
                         "memory_max_lr, compile")
    cfg.update(overrides)
    bad = set(cfg["mixers"]) - set(MIXERS)
    if bad:
        raise ValueError(f"mixers must be among {MIXERS}, got {sorted(bad)}")
    seeds = list(cfg["seeds"] if seeds is None else seeds)
    out = _grid_jobs(cfg, seeds)
    if "settings" not in overrides:  # the extra grids; explicit overrides win there too
        for grid in cfg.get("extra") or []:
            merged = {**cfg, **grid, **{k: v for k, v in overrides.items() if k != "extra"}}
            out += _grid_jobs(merged, list(grid.get("seeds", seeds)))
    return out


def cpu_seconds_per_step(mixer: str, width: int, seq_len: int, batch: int = 64, vocab: int = 512, steps: int = 2) -> float:
    """Measured seconds per training step (forward, backward, AdamW) on the CPU, after one warm-up step."""
    torch.manual_seed(0)
    model = RecallModel(mixer, width, vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    keys, values = split_vocab(vocab)
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        tokens, targets, mask = mqar_batch(batch, seq_len, min(64, seq_len // 4), keys, values, gen)
        loss = F.cross_entropy(model(tokens, mask), targets[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.fmean(times[1:])


# ---------------------------------------------------------------- report

def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(records: list[dict]) -> dict:
    """{"T{seq}_p{pairs}_b{batch}_n{steps}_v{vocab}": {seq_len, pairs, batch, steps, vocab,
    "mixers": {mixer: {width: {mean, std, n, seeds, cut_short, diverged, steps_done, seconds}}}}}."""
    groups: dict = {}
    for r in records:
        if "result" not in r:
            continue
        p, res = r["job"]["params"], r["result"]
        key = (p["seq_len"], p["pairs"], p["batch"], p["steps"], p["vocab"])  # one table per task and regime
        cell = groups.setdefault(key, {}).setdefault(p["mixer"], {}).setdefault(p["width"], [])
        cell.append((p["seed"], res))
    out = {}
    for (seq_len, pairs, batch, steps, vocab), by_mixer in sorted(groups.items()):
        setting = {}
        for mixer in [m for m in MIXERS if m in by_mixer]:
            setting[mixer] = {}
            for width, cell in sorted(by_mixer[mixer].items()):
                accs = [res["accuracy"] for _, res in cell]
                mean, std = _mean_std(accs)
                setting[mixer][width] = {"mean": mean, "std": std, "n": len(accs), "seeds": sorted(s for s, _ in cell),
                                         "cut_short": sum(bool(res["cut_short"]) for _, res in cell),
                                         "diverged": sum(bool(res.get("diverged")) for _, res in cell),
                                         "steps_done": [res["steps_done"] for _, res in cell],
                                         "seconds": statistics.fmean(res["seconds"] for _, res in cell)}
        out[f"T{seq_len}_p{pairs}_b{batch}_n{steps}_v{vocab}"] = {
            "seq_len": seq_len, "pairs": pairs, "batch": batch, "steps": steps, "vocab": vocab, "mixers": setting}
    return out


def _sentences(summary: dict) -> list[str]:
    lines = []
    for name, s in summary.items():
        best = {m: max(cells.values(), key=lambda c: c["mean"])["mean"] for m, cells in s["mixers"].items()}
        if not best:
            continue
        top, chance = max(best, key=best.get), 1 / s["pairs"]
        ranked = ", ".join(f"{m} {best[m]:.2f}" for m in sorted(best, key=best.get, reverse=True))
        recalls = [m for m in best if best[m] > chance + 0.05]
        verdict = (f"`{top}` recalls best; above chance by more than 0.05: {', '.join(recalls)}" if recalls
                   else "no mixer is more than 0.05 above chance: these runs did not learn to recall")
        lines.append(f"- seq {s['seq_len']}, {s['pairs']} pairs, batch {s['batch']} x {s['steps']} steps (chance {chance:.3f} among the sequence's "
                     f"values): best accuracy over widths by mixer: {ranked}; {verdict}.")
        grows = [m for m, cells in s["mixers"].items()
                 if len(cells) > 1 and cells[max(cells)]["mean"] > cells[min(cells)]["mean"] + 0.05]
        if grows:
            lines.append(f"  Accuracy grows by more than 0.05 from the narrowest to the widest model for: "
                         f"{', '.join(grows)}.")
        cut = sum(c["cut_short"] for cells in s["mixers"].values() for c in cells.values())
        if cut:
            lines.append(f"  {cut} run(s) stopped at their time cap before the planned steps (see steps done).")
    return lines


def report(records: list[dict], out_dir: Path, header: dict) -> None:
    """Write results.json, results.md and accuracy_vs_width.png under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(records)
    errors = [r for r in records if "error" in r]
    gpus = sorted({r.get("gpu") or r.get("device", "?") for r in records})
    write_json({"header": header, "summary": summary, "records": records}, str(out_dir / "results.json"))
    _plot(summary, out_dir / "accuracy_vs_width.png")
    steps = sorted({r["job"]["params"]["steps"] for r in records if "steps" in r["job"]["params"]})
    run_commands = []
    for f in header.get("record_files", []):
        log = Path(f).parent / "commands.txt"  # written by ``python -m benchmarks run`` (a pool suite)
        if log.exists():
            run_commands += [line.strip() for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    parts = ["# Multi-query associative recall by memory rule and width", ""]
    parts += [f"- run command: `{c}`" for c in run_commands]
    parts += [f"- report command: `{header.get('command', '?')}`",
             f"- record files: {', '.join(f'`{p}`' for p in header.get('record_files', [])) or '-'}",
             f"- device(s): {', '.join(gpus)}",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"- {len(records)} records, {len(errors)} errors; planned steps per run: {steps}", "",
             "Task: MQAR (Zoology), accuracy at the query positions of held-out sequences; mean +- std over seeds "
             "(n = seeds). Model: 2 blocks (mixer + SwiGLU), AdamW, fresh batches each step (see "
             "`benchmarks/experiments/recall.py`). A `*` marks cells where some run hit its time cap; `NaN`, cells where a run's loss became non-finite (it stopped there).", ""]
    for name, s in summary.items():
        widths = sorted({w for cells in s["mixers"].values() for w in cells})
        rows = []
        for mixer, cells in s["mixers"].items():
            row = [mixer]
            for w in widths:
                c = cells.get(w)
                row.append("" if c is None else f"{c['mean']:.3f} +- {c['std']:.3f} (n={c['n']})" + ("*" if c["cut_short"] else "") + (" NaN" if c.get("diverged") else ""))
            rows.append(row)
        parts += [f"## seq_len {s['seq_len']}, {s['pairs']} pairs (batch {s['batch']}, {s['steps']} steps, vocab {s['vocab']})", "",
                  markdown_table(["mixer"] + [f"width {w}" for w in widths], rows), ""]
    parts += ["## What the numbers show", ""] + (_sentences(summary) or ["- no finished runs."]) + [""]
    if errors:
        parts += ["## Errors", ""] + [f"- `{r['job']['name']}`: {r['error'][:300]}" for r in errors] + [""]
    parts += ["![accuracy vs width](accuracy_vs_width.png)", ""]
    (out_dir / "results.md").write_text("\n".join(parts), encoding="utf-8")


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(summary))
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.6), squeeze=False)
    for ax, (name, s) in zip(axes[0], summary.items()):
        for mixer, cells in s["mixers"].items():
            ws = sorted(cells)
            ax.errorbar(ws, [cells[w]["mean"] for w in ws], yerr=[cells[w]["std"] for w in ws], marker="o",
                        capsize=3, label=mixer)
        ax.axhline(1 / s["pairs"], color="grey", linestyle=":", linewidth=1, label="chance (1/pairs)")
        ax.set_xscale("log", base=2)
        ax.set_title(f"seq {s['seq_len']}, {s['pairs']} pairs, {s['batch']} x {s['steps']} steps")
        ax.set_xlabel("model width")
        ax.set_ylabel("query accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    if not summary:
        axes[0][0].text(0.5, 0.5, "no finished runs", ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
