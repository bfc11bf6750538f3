"""benchmarks.layers.segments_bench: a row per rule, mode and length on a CPU at tiny sizes, the
segments switch restored after use, and on CUDA the hebbian layer with segments equal to without."""

import pytest
import torch

from benchmarks.layers import segments_bench
from nl_layers.ops.linear_memory import segments


def test_rows_per_rule_mode_and_length_and_the_switch_is_restored():
    saved = segments.MIN_SEGMENT
    rows = segments_bench.main(["--device", "cpu", "--dim", "16", "--heads", "2", "--tokens", "128", "--lengths",
                                "32", "64", "--cap-seconds", "0.3", "--quiet"])
    assert [(r["rule"], r["mode"], r["length"]) for r in rows] == [
        ("hebbian", "segments", 32), ("hebbian", "segments", 64), ("hebbian", "direct", 32), ("hebbian", "direct", 64),
        ("delta", "direct", 32), ("delta", "direct", 64), ("dgd", "direct", 32), ("dgd", "direct", 64)]
    assert all(r["tokens_per_s"] > 0 and r["batch"] * r["length"] == 128 for r in rows)
    with segments_bench.direct():
        assert segments.MIN_SEGMENT > 1 << 30
    assert segments.MIN_SEGMENT == saved


@pytest.mark.gpu
def test_segments_equal_the_direct_run_on_cuda():
    pytest.importorskip("fla")
    out, grad, cuts = segments_bench.check_equal(128, 2, 8192, "cuda", torch.bfloat16)
    assert cuts > 1  # 2 heads at batch 1: the sequence is cut
    assert out < 3e-2 and grad < 3e-2, (out, grad)
