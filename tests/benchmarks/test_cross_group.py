"""benchmarks.layers.cross_group on a CPU at tiny sizes: a row per mixer, length and GROUP, and the
outputs of every GROUP equal (the check runs sequences long enough to cross several groups)."""

from benchmarks.layers import cross_group


def test_rows_and_equal_outputs():
    rows = cross_group.main(["--device", "cpu", "--dim", "16", "--heads", "2", "--tokens", "256", "--lengths", "128",
                             "--groups", "2", "4", "--mixers", "NeuralMemory", "HopeBlock", "--cap-seconds", "0.5",
                             "--quiet"])
    assert [(r["mixer"], r["group"]) for r in rows] == [("NeuralMemory", 2), ("NeuralMemory", 4), ("HopeBlock", 2),
                                                        ("HopeBlock", 4)]
    assert all(r["tokens_per_s"] > 0 and r["max_diff"] < 1e-4 for r in rows)
