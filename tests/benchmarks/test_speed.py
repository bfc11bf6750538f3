"""The speed suite's CPU-testable pieces (byte and flop accounting, table) and the GPU suites' refusal without CUDA."""

import math

import pytest
import torch

from benchmarks import speed
from benchmarks.cli import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("suite", ["layers", "memory"])  # memory: the old name of layers
def test_gpu_suites_refuse_clearly_without_cuda(suite, tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        main(["run", "--suite", suite, "--device", "cuda", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        main(["run", "--suite", suite, "--out", str(tmp_path)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_speed_suite_refuses_cuda_without_cuda(tmp_path):
    with pytest.raises(SystemExit, match="no CUDA device"):
        main(["run", "--suite", "speed", "--device", "cuda", "--out", str(tmp_path)])


def test_speed_on_cpu_times_each_optimizer_against_its_torch_counterpart():
    result = speed.run_speed("cpu", names=["SGD(foreach)", "AdamW(foreach)", "MomentumMemory", "AdamMemory"],
                             shapes=speed.cpu_param_shapes(count=2, rows=8, cols=16), warmup=1, repeats=2)
    rows = {r["optimizer"]: r for r in result["rows"]}
    assert set(rows) == {"SGD(foreach)", "AdamW(foreach)", "MomentumMemory", "AdamMemory"}
    assert all(r["dtype"] == "float32" and r["params"] == 256 and r["ms"] > 0 for r in rows.values())
    assert rows["MomentumMemory"]["torch_counterpart"] == "SGD(foreach)"
    assert rows["AdamMemory"]["torch_counterpart"] == "AdamW(foreach)"
    ratio = rows["AdamMemory"]["ms"] / rows["AdamW(foreach)"]["ms"]
    assert rows["AdamMemory"]["ratio_to_torch"] == pytest.approx(ratio)
    assert rows["AdamW(foreach)"]["ratio_to_torch"] == 1.0
    header, out = speed.speed_table(result["rows"])
    assert all(len(r) == len(header) for r in out)


def test_gpt_list_matches_benchmarks_md():
    shapes = speed.gpt_param_shapes()
    total = sum(math.prod(s) for _, s in shapes)
    matrices = sum(math.prod(s) for n, s in shapes if n != "embed")
    assert len(shapes) == 145
    assert round(total / 1e9, 2) == 1.31 and round(matrices / 1e9, 2) == 1.21


def test_bytes_per_param_for_sgd_and_adamw_measured_from_real_state():
    params = [torch.randn(6, 5, requires_grad=True), torch.randn(7, requires_grad=True)]
    for p in params:
        p.grad = torch.randn_like(p)
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    adamw = torch.optim.AdamW(params, lr=0.1)
    sgd.step(), adamw.step()
    sgd_state = speed.state_bytes_per_param(sgd, params)
    assert sgd_state == 4.0
    assert speed.bytes_per_param(4, 4, sgd_state) == 20  # fp32 SGD momentum: read+write p and m (16 B), read g (4 B)
    adam_state = speed.state_bytes_per_param(adamw, params)  # exp_avg, exp_avg_sq; the 0-d step is not counted
    assert adam_state == 8.0
    assert speed.bytes_per_param(4, 4, 8) == 28
    assert speed.bytes_per_param(2, 2, 4) == 14  # bf16 SGD momentum


def test_newton_schulz_flops_by_hand():
    # one 2 x 3 matrix, 1 step: 4 * 2^2 * 3 + 2 * 2^3 = 48 + 16; orientation does not matter
    assert speed.newton_schulz_flops([(2, 3)], steps=1) == 64
    assert speed.newton_schulz_flops([(3, 2), (2, 3)], steps=5) == 640


def test_speed_table_formats_rows_and_errors():
    rows = [{"optimizer": "SGD(fused)", "dtype": "float32", "params": 1.31e9, "tensors": 145, "ms": 10.4,
             "state_bytes_per_param": 4.0, "bytes_per_param": 20.0, "GBps": 2531.0, "copy_fraction": 0.846,
             "memory_floor_ms": 8.8, "ratio_to_muon": 0.08},
            {"optimizer": "Muon", "dtype": "float32", "params": 1.21e9, "tensors": 144, "ms": 130.0,
             "state_bytes_per_param": 4.0, "bytes_per_param": 20.0, "GBps": 186.0, "copy_fraction": 0.062,
             "memory_floor_ms": 8.1, "ns_floor_ms": 40.2, "ratio_to_muon": 1.0},
            {"optimizer": "X", "dtype": "bfloat16", "params": 1e9, "tensors": 1, "error": "OutOfMemoryError: ..."}]
    header, out = speed.speed_table(rows)
    assert len(header) == len(out[0]) == len(out[2])
    assert out[0][:4] == ["SGD(fused)", "float32", "1.31", "10.4"] and out[0][6] == "85"
    assert out[1][4] == "8.1 / 40.2"
    assert out[2][3].startswith("OutOfMemoryError")
    assert out[0][10:] == ["-", "-"]  # no back-to-back timing (the CPU's rows)
    rows[0].update(ms_chain=9.9, ratio_to_torch_chain=1.0)
    assert speed.speed_table(rows)[1][0][10:] == ["9.9", "1.00"]


def test_speed_times_every_shipped_memory_by_name():
    import deepopt

    makers = speed.speed_optimizers(device="cpu")
    names = deepopt.pretrained.available()
    expected = {"DeepMomentum.pretrained" if n == "default" else f"DeepMomentum.pretrained({n})" for n in names}
    assert expected <= set(makers) and len(expected) == len(names) >= 2
    p = torch.nn.Parameter(torch.ones(3, 4))
    for n in names:
        opt = makers[f"DeepMomentum.pretrained({n})" if n != "default" else "DeepMomentum.pretrained"]([p])
        assert opt.param_groups[0]["sigma"] == deepopt.pretrained.load(n).hyperparameters["sigma"]
    pre = makers["DeepMomentum(precondition)"]([p])
    assert pre.precondition and [type(lv).__name__ for lv in pre.chains[0].levels][0] == "DiagonalPreconditioner"
