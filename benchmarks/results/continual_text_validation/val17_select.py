"""Issue 17, second validation round: combine the validation JSONs of this folder and apply the rule
written in README.md ("The selection rule") before the new numbers. Reads only validation results.

    python benchmarks/results/continual_text_validation/val17_select.py   # writes val17_selection.json / .md
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXT_SEEDS = [100, 101, 102, 103]
ACC_SEEDS = list(range(100, 110))
C = "recipe:strength={},distill=0.1,damping=3,share={}"
CANDIDATES = {"defaults 0.03 / 3 / -": "recipe", "0.1 / 3 / 10": C.format(0.1, 10), "0.1 / 3 / 30": C.format(0.1, 30),
              "0.2 / 3 / 30": C.format(0.2, 30), "0.2 / 3 / 10": C.format(0.2, 10), "0.1 / 3 / 20": C.format(0.1, 20)}
REFS = {"finetune": "finetune", "ewc": "ewc", "si": "si"}
TEXT_FILES = ["chars600k_a", "chars600k_b", "chars600k_c", "shared_text_a", "shared_text_b", "shared_text_c",
              "shared_text_e", "val17_text_a", "val17_text_b"]
DIGITS_FILES = ["digits_check", "shared_digits_a", "shared_digits_b", "shared_digits_e", "val17_digits"]
MNIST_FILES = ["val17_mnist1d"]
ACC_SEQS = ["val_permuted_digits", "val_split_digits", "val_permuted_mnist1d"]


def text_table() -> tuple[dict, float]:
    """(setting -> {avg, bwt, learning} means over TEXT_SEEDS, or None if a seed is missing), and the
    largest disagreement between two files on the same (setting, seed)."""
    runs, worst, sizes = {}, 0.0, None
    for name in TEXT_FILES:
        d = json.loads((HERE / f"{name}.json").read_text())
        sizes = sizes or d["sizes"]
        assert d["sizes"] == sizes and d["sizes"]["max_chars"] == 600_000, name
        for row in d["rows"]:
            for r in row["runs"]:
                key = (row["setting"], r["seed"])
                vals = (r["average_final"], r["bwt"], r["learning_bpc"])
                if key in runs:
                    worst = max(worst, max(abs(a - b) for a, b in zip(vals, runs[key])))
                runs[key] = vals
    out = {}
    for setting in {s for s, _ in runs}:
        per = [runs.get((setting, s)) for s in TEXT_SEEDS]
        out[setting] = None if None in per else {k: statistics.fmean(p[i] for p in per)
                                                 for i, k in enumerate(("avg", "bwt", "learning"))}
    return out, worst


def acc_table(files: list[str]) -> tuple[dict, float]:
    out, worst = {}, 0.0
    for name in files:
        d = json.loads((HERE / f"{name}.json").read_text())
        if d["seeds"] != ACC_SEEDS:
            continue
        for row in d["rows"]:
            for seq, v in row["per_sequence"].items():
                vals = {"avg": v["average"]["mean"], "bwt": v["bwt"]["mean"], "learning": v["learning_accuracy"]["mean"]}
                key = (row["setting"], seq)
                if key in out:
                    worst = max(worst, max(abs(vals[k] - out[key][k]) for k in vals))
                out[key] = vals
    return out, worst


def main() -> dict:
    text, text_diff = text_table()
    digits, digits_diff = acc_table(DIGITS_FILES)
    mnist, mnist_diff = acc_table(MNIST_FILES)
    acc = {**digits, **mnist}
    cell = lambda setting, seq: text.get(setting) if seq == "text" else acc.get((setting, seq))  # noqa: E731
    seqs = ["text"] + ACC_SEQS
    rows, verdicts = [], {}
    for label, setting in {**REFS, **CANDIDATES}.items():
        row = {"label": label, "setting": setting, "cells": {}}
        for seq in seqs:
            v, ft, ewc, si = (cell(s, seq) for s in (setting, "finetune", "ewc", "si"))
            if v is None:
                row["cells"][seq] = None
                continue
            c = dict(v)
            if label not in REFS:
                sign = -1.0 if seq == "text" else 1.0  # bpc: lower is better
                c["avg_ge_finetune"] = sign * (v["avg"] - ft["avg"]) >= 0
                c["bwt_half"] = abs(v["bwt"]) <= 0.5 * abs(ft["bwt"])
                c["above_ewc"] = sign * (v["avg"] - ewc["avg"]) > 0
                c["above_si"] = None if si is None else sign * (v["avg"] - si["avg"]) > 0
                c["margin_ewc"] = sign * (v["avg"] - ewc["avg"])
                c["met"] = c["avg_ge_finetune"] and c["bwt_half"] and c["above_ewc"] and c["above_si"] is not False
            row["cells"][seq] = c
        if label not in REFS:
            complete = all(row["cells"][s] is not None for s in seqs)
            row["meets_all"] = complete and all(row["cells"][s]["met"] for s in seqs)
            row["min_acc_margin"] = min(row["cells"][s]["margin_ewc"] for s in ACC_SEQS) if complete else None
            row["text_margin"] = row["cells"]["text"]["margin_ewc"] if complete else None
            verdicts[label] = row["meets_all"]
        rows.append(row)
    eligible = [r for r in rows if r.get("meets_all")]
    winner = max(eligible, key=lambda r: (round(r["min_acc_margin"], 3), r["text_margin"]))["label"] if eligible else None
    result = {"rows": rows, "winner": winner, "text_seeds": TEXT_SEEDS, "accuracy_seeds": ACC_SEEDS,
              "reproduced_max_abs_diff": {"text": text_diff, "digits": digits_diff, "mnist1d": mnist_diff}}
    (HERE / "val17_selection.json").write_text(json.dumps(result, indent=1) + "\n")
    (HERE / "val17_selection.md").write_text(markdown(result, seqs))
    print(markdown(result, seqs))
    return result


def markdown(result: dict, seqs: list[str]) -> str:
    lines = ["# Issue 17, second validation round: every candidate on every validation sequence", "",
             "Cells: avg / BWT / learning (bpc for text, seeds 100-103; accuracy otherwise, seeds 100-109), "
             "then (target met: avg >= fine-tuning's, |BWT| <= 0.5x fine-tuning's, avg above EWC's and SI's; "
             "margin over EWC's avg, positive = better).", "",
             "| setting | " + " | ".join(seqs) + " | meets all | min acc margin over EWC | text margin |",
             "|" + "---|" * (len(seqs) + 4)]
    for r in result["rows"]:
        cells = []
        for s in seqs:
            c = r["cells"][s]
            if c is None:
                cells.append("-")
                continue
            t = f"{c['avg']:.3f} / {c['bwt']:+.3f} / {c['learning']:.3f}"
            if "met" in c:
                why = [] if c["met"] else [k for k, ok in (("avg<ft", c["avg_ge_finetune"]), ("BWT", c["bwt_half"]),
                                                           ("<=EWC", c["above_ewc"]), ("<=SI", c["above_si"] is not False))
                                           if not ok]
                t += f" ({'yes' if c['met'] else 'no: ' + ','.join(why)}; {c['margin_ewc']:+.3f})"
            cells.append(t)
        extra = ["", "", ""] if "meets_all" not in r else [
            "yes" if r["meets_all"] else "no",
            "-" if r["min_acc_margin"] is None else f"{r['min_acc_margin']:+.3f}",
            "-" if r["text_margin"] is None else f"{r['text_margin']:+.3f}"]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " | " + " | ".join(extra) + " |")
    lines += ["", f"Winner by the rule: **{result['winner'] or 'none meets every target'}**.", "",
              "Same (setting, seed) in two files, largest |difference|: " + ", ".join(
                  f"{k} {v:.2g}" for k, v in result["reproduced_max_abs_diff"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
