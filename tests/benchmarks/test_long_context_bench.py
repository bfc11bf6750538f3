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
    assert table[0] == "| rule | segments | T=32 | T=64 | T=128 | T=32 / T=64 | T=32 / T=128 |"
    assert table[2].startswith("| hebbian | auto | ") and table[2].endswith("x |") and len(table) == 3


def test_each_segment_count_is_a_row_of_the_delta_rules_only(capsys):
    rows = long_context_bench.main(["--device", "cpu", "--dim", "16", "--heads", "2", "--tokens", "128", "--lengths",
                                    "32", "64", "--segments", "auto", "1", "4", "--cap-seconds", "0.3"])
    assert {(r["rule"], r["segments"]) for r in rows} == {("hebbian", "auto")} | {
        (rule, mode) for rule in ("delta", "dgd") for mode in ("auto", 1, 4)}
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| delta")]
    assert [line.split(" | ")[1] for line in table] == ["auto", "1", "4"]


def test_a_bad_segment_count_is_refused():
    with pytest.raises(SystemExit):
        long_context_bench.main(["--device", "cpu", "--segments", "0"])


@pytest.mark.gpu
def test_rows_on_cuda_with_fla():
    pytest.importorskip("fla")
    rows = long_context_bench.main(["--device", "cuda", "--dim", "128", "--heads", "2", "--tokens", "8192",
                                    "--lengths", "1024", "8192", "--segments", "auto", "1", "4", "--cap-seconds", "5",
                                    "--quiet"])
    assert len(rows) == 14 and all(r["tokens_per_s"] and r["tokens_per_s"] > 0 for r in rows)


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["delta", "dgd"])
def test_the_split_layer_equals_the_unsplit_one_on_cuda(rule):
    pytest.importorskip("fla")
    from nl_layers.ops.linear_memory import fla_split

    if fla_split.unavailable() is not None:
        pytest.skip(fla_split.unavailable())
    count, out, grad = long_context_bench.check(rule, 128, 2, 8192, "cuda", mode=4)
    assert count == 4 and out < 2e-2 and grad < 5e-2, (out, grad)
