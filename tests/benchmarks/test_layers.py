"""The ``layers`` suite on CPU at tiny sizes: timing rules, caps, OOM rows, schedule, tables, plot,
progress lines, the command line and its output folder; the CUDA path is marked ``gpu``."""

import json
import os
import sys
import types

import pytest
import torch
from torch import nn

from benchmarks.cli import main, parser
from benchmarks.layers import mixers, report, run, timing
from benchmarks.layers.suite import config_from_args, write_outputs
from benchmarks.suites import SUITES, output_dir


class FakeClock:
    """Returns the given milliseconds per call (the last one repeats) and counts the calls."""

    name = "fake"

    def __init__(self, ms):
        self.ms, self.calls = list(ms), 0

    def call(self, fn):
        fn()
        self.calls += 1
        return self.ms[min(self.calls, len(self.ms)) - 1]


def test_time_calls_counts_warmup_and_repeats_and_takes_the_median():
    t = timing.time_calls(lambda: None, FakeClock([50.0, 9.0, 1.0, 3.0, 2.0]), warmup=2, repeats=3, cap_s=100)
    assert (t.ms, t.repeats, t.calls, t.first_ms) == (2.0, 3, 5, 50.0)
    fast = timing.time_calls(lambda: None, FakeClock([1.0]), warmup=1, repeats=50, min_repeats=3, target_s=0.005)
    assert fast.repeats == 5  # stops once 3+ timed calls add up to the target


def test_time_calls_stops_at_the_cap_and_skips_a_first_call_far_past_it():
    slow = timing.time_calls(lambda: None, FakeClock([30_000.0, 15_000.0]), warmup=2, repeats=5, cap_s=20)
    assert slow.repeats == 1 and slow.ms == 15_000.0 and "cap cut the warm-up" in slow.note  # first call (compile?) left out
    far = timing.time_calls(lambda: None, FakeClock([100_000.0, 30_000.0]), warmup=2, repeats=5, cap_s=20)
    assert far.ms is None and far.calls == 2 and "one call took 100 s" in far.note
    compiled = timing.time_calls(lambda: None, FakeClock([100_000.0, 5.0]), warmup=2, repeats=5, cap_s=20)
    assert compiled.ms == 5.0 and compiled.repeats == 5 and compiled.first_ms == 100_000.0  # autotuning, then fast


def test_time_calls_with_the_cpu_clock():
    t = timing.time_calls(lambda: torch.randn(64, 64).sum(), timing.CpuClock(), warmup=1, repeats=3)
    assert t.repeats == 3 and t.ms > 0


def test_measure_turns_out_of_memory_and_errors_into_rows():
    def oom(batch, length):
        def step():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return step

    row = timing.measure(oom, 2, 8, "cpu", timing.CpuClock())
    assert row["error"] == "out of memory" and row["batch"] == 2 and row["length"] == 8 and "seconds" in row

    def broken(batch, length):
        raise ValueError("bad shape")

    assert timing.measure(broken, 1, 8, "cpu", timing.CpuClock())["error"] == "ValueError: bad shape"
    ok = timing.measure(lambda b, t: (lambda: None), 4, 8, "cpu", FakeClock([2.0]), warmup=1, repeats=2)
    assert ok["tokens_per_s"] == 32 / 2e-3 and ok["repeats"] == 2 and "peak_GiB" not in ok  # CPU: no peak memory


def test_length_guard_skips_after_a_slow_or_skipped_measurement():
    guard = timing.LengthGuard(cap_s=10.0)
    assert guard.reason("a", 1024) is None
    guard.update("a", 1024, {"seconds": 42.0, "first_call_ms": 30_000.0, "ms": 100.0})
    assert guard.reason("a", 4096).startswith("skipped: T=1,024 took 12 s after its first call > cap 10 s")
    guard.update("d", 1024, {"seconds": 31.0, "first_call_ms": 30_000.0, "ms": 10.0})
    assert guard.reason("d", 4096) is None  # a slow first call (compilation, autotuning) alone skips nothing
    guard.update("b", 1024, {"seconds": 1.0, "ms": 100.0})
    assert guard.reason("b", 4096) is None  # 0.4 s per call predicted
    guard.update("c", 1024, {"skipped": "skipped: one call took 90 s"})
    assert guard.reason("c", 4096) == "skipped: T=1,024 was skipped"


def test_cheapest_first_keeps_each_case_in_length_order():
    plan = [(n, 1, t, {}) for t in (8, 16, 32) for n in ("slow", "fast")]
    gen = run.cheapest_first(plan)
    order = [next(gen)[:3]]
    cost = {"slow": 100.0, "fast": 1.0}
    while True:
        try:
            order.append(gen.send({"ms": cost[order[-1][0]]})[:3])
        except StopIteration:
            break
    assert order == [("slow", 1, 8), ("fast", 1, 8), ("fast", 1, 16), ("fast", 1, 32), ("slow", 1, 16), ("slow", 1, 32)]


def test_construct_drops_keywords_the_constructor_lacks():
    class Layer(nn.Module):
        def __init__(self, dim, heads=4):
            super().__init__()
            self.dim, self.heads, self.chunk_size = dim, heads, 16

    layer = mixers.construct(Layer, 8, heads=2, anchor_size=None, impl="torch")
    assert layer.heads == 2 and mixers.accepts(Layer, "heads") and not mixers.accepts(Layer, "impl")
    assert mixers.module_config(layer) == {"chunk_size": 16}


def test_every_case_steps_and_peers_are_optional(monkeypatch):
    real = mixers._import

    def no_peers(name):
        return (None, f"{name} not importable: ModuleNotFoundError") if name.split(".")[0] in ("fla", "titans_pytorch") \
            else real(name)

    monkeypatch.setattr(mixers, "_import", no_peers)
    cases, unavailable = mixers.mixer_cases(16, 2, "cpu", torch.float32)
    assert [c.source for c in cases] == ["ours"] * len(cases)
    assert set(unavailable) == {"fla chunk_delta_rule", "fla GatedDeltaNet layer", "titans-pytorch NeuralMemory"}
    import nl_layers

    names = [c.name for c in cases]
    rules = [f"linear {r}" for r in mixers.RULES]
    if mixers.accepts(nl_layers.LinearMemory, "impl"):  # the pure-torch path is timed too once it can be chosen
        rules += [f"{n} (torch)" for n in rules] + ["linear delta (op only)", "linear delta gated (op only)"]
    assert names[0] == "SDPA attention"
    assert set(names) == {"SDPA attention", "Titans NeuralMemory", "SelfModifyingTitans", "HopeBlock", *rules}
    for case in cases:
        step = case.make(2, 8)
        step()
        step()


def test_a_fake_titans_pytorch_becomes_a_peer_column(monkeypatch):
    fake = types.ModuleType("titans_pytorch")

    class NeuralMemory(nn.Module):
        def __init__(self, dim, chunk_size=1, heads=1):
            super().__init__()
            self.lin, self.chunk_size = nn.Linear(dim, dim), chunk_size

        def forward(self, x):
            return self.lin(x), None

    fake.NeuralMemory = NeuralMemory
    monkeypatch.setitem(sys.modules, "titans_pytorch", fake)
    unavailable = {}
    cases = mixers.titans_cases(16, 2, 4, "cpu", torch.float32, unavailable)
    assert [c.source for c in cases] == ["ours", "ours", "titans-pytorch"] and not unavailable
    cases[-1].make(2, 8)()
    cfg = run.LayersConfig.smoke(parts=("titans",), titans_lengths=(8,))
    out = run.run_layers(cfg, "cpu", log=lambda s: None)
    header, rows = report.titans_table(out["rows"], cfg.titans_lengths)
    peer = [r for r in rows if r[2] == "titans-pytorch NeuralMemory"][0]
    ours = [r for r in rows if r[2] == "Titans NeuralMemory"][0]
    assert peer[-1] == "" and ours[-1].endswith("x")


def test_smoke_run_prints_one_line_per_row_and_writes_tables_and_plot(tmp_path, capsys):
    cfg = run.LayersConfig.smoke(peers=False)
    out = run.run_layers(cfg, "cpu")
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("layers: ") and " | " in line]
    assert len(printed) == len(out["rows"])
    sections = {r["section"] for r in out["rows"]}
    assert sections == {"mixers", "titans", "lm"}
    assert all("tokens_per_s" in r for r in out["rows"]), [r for r in out["rows"] if "tokens_per_s" not in r]
    assert [r["section"] for r in out["rows"]][0] == "lm"  # the cheap LM table runs first
    out.update(machine={"cpu": "test CPU"}, versions={"python": "3", "torch": "2"}, command="x", date="today")
    paths = write_outputs(out, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["results.json", "results.md", "layers.png"]
    md = (tmp_path / "results.md").read_text()
    assert "## Mixers" in md and "## Titans memories" in md and "## Language-model training step" in md
    assert "x SDPA T=8" in md and "16/8" in md
    assert json.loads((tmp_path / "results.json").read_text())["config"]["lengths"] == [8, 16]
    header, rows = report.summary(out)
    assert rows[-1][0] == "LM TitansLM" and "x)" in rows[-1][1]


def test_a_spent_budget_skips_every_row_with_the_reason():
    cfg = run.LayersConfig.smoke(peers=False, budget_s=0.0, parts=("mixers",))
    out = run.run_layers(cfg, "cpu", log=lambda s: None)
    assert out["rows"] and all(r["skipped"] == "skipped: the mixers part's time budget was spent" for r in out["rows"])
    assert "skipped" in report.layers_markdown(dict(out, machine={"cpu": "c"}, versions={"python": "3", "torch": "2"},
                                                    command="x", date="d"))


def test_report_ratios_to_sdpa_titans_pytorch_and_the_transformer():
    rows = [{"section": "mixers", "name": "SDPA attention", "source": "ours", "length": t, "batch": 1, "tokens_per_s": 2e7,
             "peak_GiB": 1.0} for t in (1024, 65536)]
    rows += [{"section": "mixers", "name": "linear delta", "source": "ours", "length": 1024, "batch": 64, "tokens_per_s": 1e7},
             {"section": "mixers", "name": "linear delta", "source": "ours", "length": 65536, "batch": 1,
              "error": "out of memory"}]
    rows += [{"section": "titans", "name": n, "source": "x", "dtype": "bf16", "chunk": 16, "length": 1024, "batch": 4,
              "tokens_per_s": v} for n, v in (("Titans NeuralMemory", 4e4), ("titans-pytorch NeuralMemory", 2e4))]
    rows += [{"section": "lm", "name": n, "source": "ours", "precision": "fp32", "batch": 32, "length": 256, "ms": ms,
              "tokens_per_s": 1.0, "config": {"params": 1e6}} for n, ms in (("TransformerLM", 20.0), ("TitansLM", 50.0))]
    assert report.mixer_table(rows, (1024, 65536))[1][1] == ["linear delta", "ours", "10.00 M", "OOM"]
    assert report.mixer_ratio_table(rows, (1024, 65536))[1] == [["SDPA attention", "1.00x", "1.00x", "1.00x"],
                                                                ["linear delta", "0.50x", "-", "-"]]
    assert report.titans_table(rows, (1024,))[1][0][-1] == "2.00x"
    assert report.lm_table(rows, ("fp32",))[1][1] == ["TitansLM", "1.00", "50.0", "2.50x"]
    assert report.problems(rows) == ["- mixers: linear delta at 1 x 65536: out of memory"]


def test_layers_options_and_the_output_folder_rule(tmp_path, monkeypatch):
    args = parser().parse_args(["run", "--suite", "layers", "--dim", "256", "--heads", "4", "--tokens", "4096",
                                "--cap-seconds", "5", "--budget-seconds", "60", "--no-peers"])
    cfg = config_from_args(args)
    assert (cfg.dim, cfg.heads, cfg.tokens, cfg.cap_s, cfg.budget_s, cfg.peers) == (256, 4, 4096, 5.0, 60.0, False)
    with pytest.raises(SystemExit, match="not divisible"):
        config_from_args(parser().parse_args(["run", "--suite", "layers", "--dim", "100", "--heads", "8"]))
    layers = SUITES["layers"]
    assert output_dir(layers).startswith(os.path.join("runs", "layers-"))
    assert output_dir(layers, update=True).endswith(os.path.join("benchmarks", "results", "layers"))
    assert output_dir(layers, out="/x") == "/x"
    assert output_dir(SUITES["speed"]).startswith(os.path.join("runs", "speed-"))
    pool = [SUITES["lm"], SUITES["recall"]]
    assert output_dir(pool).startswith(os.path.join("runs", "evidence-"))
    assert output_dir(pool[:1], update=True).endswith(os.path.join("benchmarks", "results", "evidence"))
    committed = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "benchmarks", "results", "x")
    with pytest.raises(SystemExit, match="--update-results"):
        main(["run", "--suite", "layers", "--smoke", "--device", "cpu", "--out", committed])


def test_cli_smoke_run_on_cpu_writes_a_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--suite", "memory", "--smoke", "--device", "cpu", "--no-peers", "--parts", "lm"]) == 0
    printed = capsys.readouterr().out
    assert "--suite memory is now --suite layers" in printed
    folders = list((tmp_path / "runs").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("layers-")
    assert {p.name for p in folders[0].iterdir()} == {"results.json", "results.md", "layers.png"}
    assert printed.rstrip().splitlines()[-1] == f"results written to {os.path.join('runs', folders[0].name)}"


@pytest.mark.gpu
def test_cuda_path_times_with_events_and_reads_peak_memory():
    cfg = run.LayersConfig.smoke(dtype="bf16", titans_dtypes=("bf16",), lm_precisions=("fp32", "bf16"))
    out = run.run_layers(cfg, "cuda")
    assert out["clock"] == "CUDA events"
    measured = [r for r in out["rows"] if "tokens_per_s" in r]
    assert measured and all(r["peak_GiB"] > 0 for r in measured)


def test_a_failing_plot_leaves_the_tables(tmp_path, monkeypatch):
    from benchmarks.layers import suite

    def no_matplotlib(result, path):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(suite, "plot_layers", no_matplotlib)
    result = {"config": run.LayersConfig.smoke().__dict__ | {"timing": {"repeats": 2}}, "rows": [], "clock": "c",
              "machine": {"cpu": "c"}, "versions": {"python": "3", "torch": "2"}, "command": "x", "date": "d"}
    paths = write_outputs(result, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["results.json", "results.md"]


def test_mixers_option_keeps_only_the_named_mixers():
    from benchmarks.layers.run import LayersConfig, plans

    planned, _ = plans(LayersConfig.smoke(parts=("mixers",), mixers=("op only",), peers=False), "cpu")
    names = {case.name for case, *_ in planned["mixers"]}
    assert names and all("(op only)" in n for n in names)
