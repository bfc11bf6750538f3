"""benchmarks.layers.lm_profile: the step-anatomy table runs end to end (CPU smoke: eager times only)."""

import json

from benchmarks.layers import lm_profile


def test_smoke_run_writes_every_model_and_chunk(tmp_path):
    lm_profile.main(["--device", "cpu", "--dim", "16", "--depth", "1", "--batch", "2", "--seq", "8",
                     "--models", "TransformerLM", "TitansLM", "--chunks", "4", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "lm_profile.json").read_text())
    assert [r["model"] for r in rows] == ["TransformerLM", "TitansLM", "TitansLM chunk 4"]
    assert all("error" not in r and r["eager_ms"] > 0 for r in rows)
    assert "| TitansLM chunk 4 |" in (tmp_path / "lm_profile.md").read_text()
