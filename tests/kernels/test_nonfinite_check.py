"""The non-finite check as a Triton kernel (the interpreter on a CPU, compiled on CUDA) against its
torch form, and the shell's flag taking it on CUDA."""

import pytest
import torch

from deepopt.kernels.launch import interpreting
from deepopt.kernels.nonfinite import CHECK_CONFIGS, kernel_nonfinite_flag, nonfinite_flag_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture(autouse=True)
def _kernel_runs_here():
    if DEVICE == "cpu" and not interpreting():
        pytest.skip("the kernel runs on CUDA or in Triton's interpreter (TRITON_INTERPRET=1)")


def both(ts):
    return float(kernel_nonfinite_flag(ts)), float(nonfinite_flag_torch(ts))


def finite_list(dtype):
    """Odd sizes (a block's tail), a tensor over two blocks, extremes of the dtype, views."""
    big = torch.finfo(dtype).max
    n2 = CHECK_CONFIGS[dtype.itemsize][0] + 37
    wide = torch.randn(6, 10, device=DEVICE).to(dtype)
    return [torch.randn(33, device=DEVICE).to(dtype), torch.randn(n2, device=DEVICE).to(dtype),
            torch.tensor([big, -big, torch.finfo(dtype).tiny / 4, -0.0, 0.0], device=DEVICE, dtype=dtype),
            wide.mT, wide[:, ::3], torch.empty(0, device=DEVICE, dtype=dtype)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_finite_gradients_leave_the_flag_at_zero(dtype):
    assert both(finite_list(dtype)) == (0.0, 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_nonfinite_entry_anywhere_sets_the_flag(dtype, bad):
    ts = finite_list(dtype)
    for j in range(len(ts) - 1):  # every non-empty tensor, its first and last entry
        for pos in (0, -1):
            case = [t.clone() for t in ts]
            case[j][(pos,) * case[j].ndim] = bad  # (the views' clones keep their strides)
            assert both(case) == (1.0, 1.0), (j, pos)
    view = ts[3].clone().mT  # a transposed view of a contiguous tensor: the entry is found through the view
    view[2, 5] = bad
    assert both([view]) == (1.0, 1.0)


def test_several_dtypes_and_a_set_flag_stay_set():
    ts = [torch.randn(100, device=DEVICE), torch.randn(70, device=DEVICE).bfloat16()]
    assert float(kernel_nonfinite_flag(ts)) == 0.0
    ts[1][69] = float("nan")
    assert float(kernel_nonfinite_flag(ts)) == 1.0
    found = torch.ones(1, device=DEVICE)  # the kernel only ever sets the flag
    assert float(kernel_nonfinite_flag(ts[:1], found)) == 1.0
    assert float(kernel_nonfinite_flag([torch.empty(0, device=DEVICE)])) == 0.0


@pytest.mark.gpu
def test_the_shell_checks_cuda_gradients_with_the_kernel(monkeypatch):
    from deepopt.kernels import nonfinite
    from deepopt.optim import conventions

    calls = []
    real = nonfinite.kernel_nonfinite_flag
    monkeypatch.setattr(conventions, "kernel_nonfinite_flag", lambda ts: calls.append(len(ts)) or real(ts))
    import deepopt

    p = [torch.nn.Parameter(torch.ones(64, 64, device="cuda")), torch.nn.Parameter(torch.ones(64, device="cuda"))]
    opt = deepopt.AdamMemory(p, lr=0.1)
    p[0].grad, p[1].grad = torch.ones_like(p[0]), torch.ones_like(p[1])
    p[1].grad[3] = float("inf")
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        opt.step()
        assert opt.skipped_steps == 1
    assert calls == [2] and bool((p[0] == 1).all())
    p[1].grad[3] = 0.0
    opt.step()
    assert opt.skipped_steps == 1 and bool((p[0] < 1).all())


@pytest.mark.gpu
def test_a_cuda_step_with_an_empty_parameter():
    import deepopt

    p = [torch.nn.Parameter(torch.ones(8, 8, device="cuda")), torch.nn.Parameter(torch.empty(0, device="cuda"))]
    opt = deepopt.MomentumMemory(p, lr=0.1)
    for q in p:
        q.grad = torch.ones_like(q)
    opt.step()
    assert opt.skipped_steps == 0 and bool((p[0] < 1).all())


def test_kernel_compiles_for_sm90_in_every_dtype(monkeypatch):
    """Its launches in the interpreter (each dtype, aligned and not), compiled for sm90 as on a GPU."""
    if not interpreting():
        pytest.skip("records launches through Triton's interpreter (a CPU run)")
    from ..triton_compile import compile_failures, record

    def calls():
        for dtype in DTYPES:
            kernel_nonfinite_flag([torch.randn(64).to(dtype), torch.randn(7).to(dtype)])
            kernel_nonfinite_flag([torch.randn(64).to(dtype)])

    launches = record(monkeypatch, calls)
    assert len(launches) == 2 * len(DTYPES)
    assert not compile_failures(launches)
