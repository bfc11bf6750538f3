"""benchmarks.layers.long_context_bench: a row per rule and length on a CPU at tiny sizes, and on
CUDA (with fla) the same rows in bf16 at a small size."""

import pytest

from benchmarks.layers import long_context_bench


def test_a_row_per_rule_and_length_with_the_batch_from_the_tokens():
    rows = long_context_bench.main(["--device", "cpu", "--dim", "16", "--heads", "2", "--tokens", "128", "--lengths",
                                    "32", "64", "--cap-seconds", "0.3", "--quiet"])
    assert [(r["rule"], r["length"]) for r in rows] == [
        ("hebbian", 32), ("hebbian", 64), ("delta", 32), ("delta", 64), ("dgd", 32), ("dgd", 64)]
    assert all(r["tokens_per_s"] > 0 and r["batch"] * r["length"] == 128 for r in rows)


def test_the_table_gives_the_ratio_to_the_first_length(capsys):
    long_context_bench.main(["--device", "cpu", "--dim", "16", "--heads", "2", "--tokens", "128", "--lengths",
                             "32", "64", "128", "--rules", "hebbian", "--cap-seconds", "0.3"])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert table[0] == "| rule | T=32 | T=64 | T=128 | T=32 / T=64 | T=32 / T=128 |"
    assert table[2].startswith("| hebbian | ") and table[2].endswith("x |") and len(table) == 3


@pytest.mark.gpu
def test_rows_on_cuda_with_fla():
    pytest.importorskip("fla")
    rows = long_context_bench.main(["--device", "cuda", "--dim", "128", "--heads", "2", "--tokens", "8192",
                                    "--lengths", "1024", "8192", "--cap-seconds", "5", "--quiet"])
    assert len(rows) == 6 and all(r["tokens_per_s"] and r["tokens_per_s"] > 0 for r in rows)
