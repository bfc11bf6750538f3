"""benchmarks.layers.matmul_layouts: the step's matrix products, recorded and replayed in other layouts."""

import json

import torch

from benchmarks.layers import matmul_layouts as ml


def _results(p: ml.Product, seed=0):
    out = {}
    for v in ("as is", "contiguous", "swapped", "padded") + (("split",) if p.addend is not None else ()):
        torch.manual_seed(seed)  # the same operand values for every variant
        out[v] = ml._runner(p, v, "cpu", torch.float64)()
    m, n = out["as is"].shape[-2:]
    out["padded"] = out["padded"][..., :m, :n]  # the zero padding's extra rows and columns cut off
    return out


def test_recorder_keeps_strides_offsets_and_alpha_beta():
    buf = torch.randn(6, 10)
    a, b, c = buf[:, 1:5], torch.randn(3, 4).mT, torch.randn(6, 3)
    with ml.Recorder() as r:
        torch.addmm(c, a, b, beta=0.5, alpha=2.0)
        torch.addmm(c, a, b, beta=0.5, alpha=2.0)
        torch.bmm(torch.randn(2, 3, 4), torch.randn(2, 4, 5))
    (p, (calls, _)), (q, (qcalls, _)) = r.seen.items()
    assert (p.name, calls, q.name, qcalls) == ("addmm", 2, "bmm", 1)
    assert p.a == ml.Layout((6, 4), (10, 1), 1) and p.b == ml.Layout((4, 3), (1, 4), 0)
    assert p.alpha_beta == (0.5, 2.0)
    assert p.work() == (4 * (6 * 4 + 4 * 3 + 6 * 3 + 6 * 3), 2 * 6 * 3 * 4)


def test_every_variant_computes_the_recorded_product():
    buf = torch.randn(6, 10)
    cases = [
        lambda: torch.addmm(torch.randn(6, 3), buf[:, 1:5], torch.randn(3, 4).mT, beta=0.5, alpha=2.0),
        lambda: torch.addmm(torch.randn(3), buf[:, :4], torch.randn(4, 3)),  # a bias addend
        lambda: torch.randn(2, 6, 3).baddbmm_(torch.randn(2, 6, 4), torch.randn(2, 3, 4).mT),
        lambda: torch.bmm(torch.randn(2, 3, 4).mT, torch.randn(2, 3, 5)),
        lambda: torch.mm(buf[:, 2:7], torch.randn(5, 2)),
    ]
    for case in cases:
        with ml.Recorder() as r:
            case()
        (p,) = r.seen
        res = _results(p)
        for v, y in res.items():
            assert y.shape == res["as is"].shape, (p.label(), v)
            torch.testing.assert_close(y, res["as is"], msg=f"{p.label()} {v}")


def test_smoke_run_writes_the_table(tmp_path):
    rows = ml.main(["--device", "cpu", "--model", "HopeLM()", "--dim", "16", "--depth", "1", "--heads", "2",
                    "--batch", "1", "--seq", "8", "--repeat", "1", "--out", str(tmp_path)])
    assert rows and all(r["calls"] >= 1 and r["as is"] > 0 for r in rows)
    assert any(r["site"].startswith("bwd ") for r in rows) and any(r["site"].startswith("fwd nl_layers") for r in rows)
    assert json.loads((tmp_path / "matmul_layouts.json").read_text()) == rows
    text = (tmp_path / "matmul_layouts.md").read_text()
    assert "| product | call site |" in text and "products a step, timed alone" in text
