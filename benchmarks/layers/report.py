"""Tables, Markdown, plot and terminal summary of a ``layers`` result (see :mod:`.run`).

Cells: ``12.30 M`` tokens/s (forward + backward) with the peak memory in brackets; ``OOM``,
``error`` or ``skipped`` (the reasons are listed under the tables). Ratios: tokens/s over SDPA's
at the same T (above 1 = faster than attention), and a mixer's tokens/s at the longest T over its
tokens/s at the shortest (1 = its cost per token does not grow with T); in the Titans table, ours
over titans-pytorch's at the same dtype, chunk and T; in the LM table, ms per step over
TransformerLM's at the same precision (the issue's target: <= 2x).

Example:
    >>> rows = [{"section": "mixers", "name": "SDPA attention", "length": 1024, "tokens_per_s": 2e7, "peak_GiB": 1.0},
    ...         {"section": "mixers", "name": "linear delta", "length": 1024, "tokens_per_s": 1e7, "peak_GiB": 0.5}]
    >>> header, table = mixer_ratio_table(rows, (1024,))
    >>> table
    [['SDPA attention', '1.00x', '-'], ['linear delta', '0.50x', '-']]
"""

from __future__ import annotations

import os
from typing import Sequence

from ..report import markdown_table

SDPA = "SDPA attention"
PEER = "titans-pytorch NeuralMemory"
LM_BASE = "TransformerLM"


def fmt_length(t: int) -> str:
    return f"{t // 1024}K" if t % 1024 == 0 else str(t)


def fmt_rate(r: float) -> str:
    return f"{r / 1e6:.2f} M" if r >= 1e6 else f"{r / 1e3:.1f} k"


def status(row: dict | None) -> str:
    """A failed or skipped row's short cell."""
    if row is None:
        return ""
    if row.get("error") == "out of memory":
        return "OOM"
    return "error" if "error" in row else "skipped"


def cell(row: dict | None, memory: bool = True) -> str:
    if row is None or "tokens_per_s" not in row:
        return status(row)
    gib = f" ({row['peak_GiB']:.1f} GiB)" if memory and row.get("peak_GiB") is not None else ""
    return fmt_rate(row["tokens_per_s"]) + gib


def ratio(a: dict | None, b: dict | None) -> str:
    if not a or not b or "tokens_per_s" not in a or "tokens_per_s" not in b:
        return "-"
    return f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x"


def _names(rows: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(r["name"] for r in rows))


def _index(rows: Sequence[dict], section: str) -> dict:
    return {(r["name"], r.get("dtype"), r.get("chunk"), r["length"]): r for r in rows if r["section"] == section}


def mixer_table(rows: Sequence[dict], lengths: Sequence[int]) -> tuple[list[str], list[list[str]]]:
    """Mixer x T: tokens/s (peak GiB)."""
    mine = [r for r in rows if r["section"] == "mixers"]
    at = {(r["name"], r["length"]): r for r in mine}
    header = ["mixer", "source"] + [f"T={fmt_length(t)}" for t in lengths]
    source = {r["name"]: r["source"] for r in mine}
    return header, [[n, source[n]] + [cell(at.get((n, t))) for t in lengths] for n in _names(mine)]


def mixer_ratio_table(rows: Sequence[dict], lengths: Sequence[int]) -> tuple[list[str], list[list[str]]]:
    """Mixer x T: tokens/s over SDPA's; and the longest-T over shortest-T tokens/s."""
    mine = [r for r in rows if r["section"] == "mixers"]
    at = {(r["name"], r["length"]): r for r in mine}
    lo, hi = min(lengths), max(lengths)
    header = ["mixer"] + [f"x SDPA T={fmt_length(t)}" for t in lengths] + [f"{fmt_length(hi)}/{fmt_length(lo)}"]
    out = []
    for n in _names(mine):
        growth = ratio(at.get((n, hi)), at.get((n, lo))) if hi != lo else "-"
        out.append([n] + [ratio(at.get((n, t)), at.get((SDPA, t))) for t in lengths] + [growth])
    return header, out


def titans_table(rows: Sequence[dict], lengths: Sequence[int]) -> tuple[list[str], list[list[str]]]:
    """(dtype, chunk, layer) x T: tokens/s and the ratio to titans-pytorch's."""
    mine = [r for r in rows if r["section"] == "titans"]
    at = _index(rows, "titans")
    keys = list(dict.fromkeys((r.get("dtype"), r.get("chunk"), r["name"]) for r in mine))
    header = ["dtype", "chunk", "layer"] + [f"T={fmt_length(t)}" for t in lengths] + \
             [f"x titans-pytorch T={fmt_length(t)}" for t in lengths]
    out = []
    for dtype, chunk, name in keys:
        cells = [cell(at.get((name, dtype, chunk, t))) for t in lengths]
        ratios = ["" if name == PEER else ratio(at.get((name, dtype, chunk, t)), at.get((PEER, dtype, chunk, t)))
                  for t in lengths]
        out.append([dtype, str(chunk), name] + cells + ratios)
    return header, out


def lm_table(rows: Sequence[dict], precisions: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Model x precision: ms per AdamW step and the ratio to TransformerLM's."""
    mine = [r for r in rows if r["section"] == "lm"]
    at = {(r["name"], r["precision"]): r for r in mine}
    header = ["model", "params (M)"] + [h for p in precisions for h in (f"ms/step {p}", f"x Transformer {p}")]
    out = []
    for n in _names(mine):
        params = next((r["config"].get("params") for r in mine if r["name"] == n and r.get("config", {}).get("params")), None)
        cells = []
        for p in precisions:
            r, base = at.get((n, p)), at.get((LM_BASE, p))
            ok = r is not None and "ms" in r
            cells.append(f"{r['ms']:.1f}" if ok else status(r))
            cells.append(f"{r['ms'] / base['ms']:.2f}x" if ok and base and "ms" in base else "-")
        out.append([n, "-" if params is None else f"{params / 1e6:.2f}"] + cells)
    return header, out


def problems(rows: Sequence[dict]) -> list[str]:
    """One Markdown bullet per failed or skipped row, with its reason."""
    out = []
    for r in rows:
        reason = r.get("error") or r.get("skipped")
        if reason:
            extra = "".join(f" {r[k]}" for k in ("dtype", "precision") if r.get(k)) + \
                    (f" chunk {r['chunk']}" if r.get("chunk") else "")
            out.append(f"- {r['section']}: {r['name']}{extra} at {r['batch']} x {r['length']}: {reason}")
    return out


def header_lines(result: dict) -> list[str]:
    m, v = result["machine"], result["versions"]
    names = ("torch", "triton", "fla-core", "flash-linear-attention", "titans-pytorch", "git_commit")
    return [f"- command: `{result['command']}`", f"- date: {result['date']}; GPU: {m.get('gpu') or m['cpu'] + ' (CPU)'}",
            "- versions: " + ", ".join(f"{k} {v[k]}" for k in names if v.get(k)) + f"; python {v['python']}",
            f"- timing: {result['clock']}; median of up to {result['config']['timing']['repeats']} timed calls after "
            f"warm-up; cap {result['config']['cap_s']:.0f} s per measurement, budget {result['config']['budget_s']:.0f} s; "
            f"wall time {result.get('wall_seconds', 0):.0f} s; TF32 matmuls on; nl_layers NaN checks off"]


def layers_markdown(result: dict, plot_names: Sequence[str] = ()) -> str:
    """The whole results.md."""
    c, rows = result["config"], result["rows"]
    parts = ["# `layers` suite results", ""] + header_lines(result) + [""]
    if any(r["section"] == "mixers" for r in rows):
        parts += [f"## Mixers: forward + backward tokens/s (peak memory), dim {c['dim']}, {c['heads']} heads x "
                  f"{c['dim'] // c['heads']}, {c['dtype']} weights and inputs, {c['tokens']:,} tokens per call "
                  "(batch = tokens / T)", "", markdown_table(*mixer_table(rows, c["lengths"])), "",
                  "Ratios: tokens/s over SDPA attention's at the same T; last column: tokens/s at the longest T "
                  "over the shortest.", "", markdown_table(*mixer_ratio_table(rows, c["lengths"])), ""]
        configs = {r["name"]: r["config"] for r in rows if r["section"] == "mixers" and r.get("config")}
        if configs:
            parts += ["Built configurations: " + "; ".join(
                f"{n}: " + ", ".join(f"{k}={v}" for k, v in cfg.items()) for n, cfg in configs.items() if cfg), ""]
    if any(r["section"] == "titans" for r in rows):
        parts += [f"## Titans memories against titans-pytorch: dim {c['titans_dim']}, {c['titans_heads']} heads, "
                  f"{c['titans_tokens']:,} tokens per call", "",
                  "titans-pytorch's `NeuralMemory(dim, chunk_size=C, heads=H)` has H heads of width dim each; "
                  "ours split dim over the heads.", "", markdown_table(*titans_table(rows, c["titans_lengths"])), ""]
    if any(r["section"] == "lm" for r in rows):
        parts += [f"## Language-model training step: vocab {c['lm_vocab']}, dim {c['lm_dim']}, depth {c['lm_depth']}, "
                  f"{c['lm_heads']} heads, batch {c['lm_batch']} x {c['lm_seq']}, AdamW step included", "",
                  "Median ms per step; ratio to TransformerLM at the same precision (target for TitansLM and "
                  "HopeLM: <= 2x). fp32: fp32 weights and activations (TF32 matmuls); bf16: bf16 autocast.", "",
                  markdown_table(*lm_table(rows, c["lm_precisions"])), ""]
    if result.get("unavailable"):
        parts += ["## Peers not measured", ""] + [f"- {k}: {v}" for k, v in result["unavailable"].items()] + [""]
    trouble = problems(rows)
    if trouble:
        parts += ["## Skipped and failed measurements", ""] + trouble + [""]
    parts += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plot_names]
    return "\n".join(parts) + "\n"


def plot_layers(result: dict, path: str) -> str:
    """tokens/s against T (log-log): the mixers, and the Titans comparison (one panel per dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "tokens_per_s" in r]
    panels = [("mixers", None)] + [("titans", d) for d in dict.fromkeys(r["dtype"] for r in rows if r["section"] == "titans")]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.8), squeeze=False)
    for ax, (section, dtype) in zip(axes[0], panels):
        mine = [r for r in rows if r["section"] == section and (dtype is None or r["dtype"] == dtype)]
        for key in dict.fromkeys((r["name"], r.get("chunk")) for r in mine):
            pts = sorted((r["length"], r["tokens_per_s"]) for r in mine if (r["name"], r.get("chunk")) == key)
            label = key[0] + (f" chunk {key[1]}" if key[1] else "")
            style = "--" if any(r["source"] != "ours" for r in mine if r["name"] == key[0]) else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T (tokens per call fixed)")
        ax.set_ylabel("tokens/s, forward + backward")
        c = result["config"]
        ax.set_title(f"mixers: dim {c['dim']}, {c['heads']} heads, {c['dtype']}" if section == "mixers"
                     else f"Titans: dim {c['titans_dim']}, {c['titans_heads']} heads, {dtype} (dashed: peers)")
        ax.grid(alpha=0.3, which="both")
        if mine:
            ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary(result: dict) -> tuple[list[str], list[list[str]]]:
    """The terminal's last table: each mixer's tokens/s per T, then each LM's ms per step and ratio
    to TransformerLM per precision."""
    c, rows = result["config"], result["rows"]
    width = max(len(c["lengths"]), len(c["lm_precisions"]))
    header = ["what"] + ([f"T={fmt_length(t)}" for t in c["lengths"]] + [""] * width)[:width]
    mix = {(r["name"], r["length"]): r for r in rows if r["section"] == "mixers"}
    out = [[n] + ([cell(mix.get((n, t)), memory=False) for t in c["lengths"]] + [""] * width)[:width]
           for n in _names([r for r in rows if r["section"] == "mixers"])]
    for r in lm_table(rows, c["lm_precisions"])[1]:
        cells = [f"{p}: {r[2 + 2 * i]} ms ({r[3 + 2 * i]})" for i, p in enumerate(c["lm_precisions"])]
        out.append([f"LM {r[0]}"] + (cells + [""] * width)[:width])
    return header, out
