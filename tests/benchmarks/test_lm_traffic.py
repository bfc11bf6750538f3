"""benchmarks.layers.lm_traffic: operator and byte counts of a training step (CPU and meta smoke runs)."""

import json

import torch

from benchmarks.layers import lm_traffic


def test_counts_bytes_of_inputs_and_outputs_and_skips_views():
    x, w = torch.ones(3, 4), torch.ones(4, 5)
    with lm_traffic.Traffic() as t:
        y = (x @ w).t().reshape(-1)  # mm: 48 + 80 read, 60 written; t() is a view; reshape of a transpose copies
    assert y.shape == (15,)
    assert t.by_op[("mm.default", "[[3, 4], [4, 5]]")] == [1, 48 + 80 + 60]
    assert t.total() == (2, 48 + 80 + 60 + 2 * 60)


def test_allocations_move_nothing_and_an_out_argument_counts_once():
    x = torch.ones(4, 8)
    with lm_traffic.Traffic() as t:
        y = torch.empty_like(x)
        torch.mul(x, 2.0, out=y)  # reads x (128 bytes), writes y (128); y is not read
        x.new_zeros(2)  # writes 8 bytes, reads nothing
    assert t.total() == (2, 128 + 128 + 8)


def test_broadcast_input_counts_once():
    x = torch.ones(4).expand(1000, 4)
    with lm_traffic.Traffic() as t:
        x.sum()
    assert t.total() == (1, 16 + 4)


def test_smoke_runs_on_cpu_and_meta(tmp_path):
    args = ["--dim", "16", "--depth", "1", "--batch", "2", "--seq", "8", "--models", "TransformerLM", "TitansLM"]
    rows = lm_traffic.main(args + ["--device", "cpu", "--out", str(tmp_path / "cpu")])
    meta = lm_traffic.main(args + ["--device", "meta", "--out", str(tmp_path / "meta")])
    assert [r["model"] for r in rows] == ["TransformerLM", "TitansLM"]
    assert all(r["ms"] > 0 and r["ops"] > 0 for r in rows) and all(r["ms"] is None for r in meta)
    # the same step on meta tensors has the same operators and bytes (SDPA picks another kernel on meta)
    assert (rows[1]["ops"], rows[1]["mb"]) == (meta[1]["ops"], meta[1]["mb"])
    assert json.loads((tmp_path / "cpu" / "lm_traffic.json").read_text()) == rows
    text = (tmp_path / "cpu" / "lm_traffic.md").read_text()
    assert "| TitansLM |" in text and "fast_weights/engines.py" in text  # the call-site table names the fast-weight code
