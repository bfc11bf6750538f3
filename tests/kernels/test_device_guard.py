"""Triton launches on the current CUDA device (and its stream): the fused steps, the NaN/Inf check
and the symmetric products switch to their tensors' device when it is not the current one."""

import contextlib
import importlib

import pytest
import torch

import deepopt

launch_module = importlib.import_module("deepopt.kernels.launch")


def test_on_device_switches_only_to_another_cuda_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def cuda_device(device):
        entered.append(torch.device(device).index)
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", cuda_device)
    for device in (torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cuda", 3)):
        with launch_module.on_device(device):
            pass
    assert entered == [1, 3]


def test_fused_step_and_check_run_inside_the_guard_of_their_device(monkeypatch):
    """The fused step and the kernel NaN/Inf check enter the guard with their tensors' device (on
    the CPU, kernels interpreted, a null context: the wiring)."""
    pytest.importorskip("triton", reason="triton is not installed (the 'dev' extra brings it)")
    from deepopt.kernels.nonfinite import kernel_nonfinite_flag

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu" and not launch_module.interpreting():
        pytest.skip("the kernels need CUDA or Triton's interpreter")
    seen = []
    real = launch_module.on_device
    monkeypatch.setattr(launch_module, "on_device", lambda d: seen.append(d) or real(d))
    p = torch.nn.Parameter(torch.ones(4, device=device))
    p.grad = torch.ones(4, device=device)
    deepopt.AdamMemory([p], lr=0.1, impl="triton").step()
    assert seen and all(d == device for d in seen)
    nonfinite = importlib.import_module("deepopt.kernels.nonfinite")
    monkeypatch.setattr(nonfinite, "on_device", lambda d: seen.append(("check", d)) or real(d))
    kernel_nonfinite_flag([p.grad])
    assert seen[-1] == ("check", device)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("name", ["AdamMemory", "MomentumMemory", "DeltaMomentum", "DeepMomentum", "MuonMemory", "M3"])
def test_step_on_the_second_gpu_while_the_first_is_current(name):
    def steps(device):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 8)).to(device)
        opt = deepopt.OPTIMIZERS[name](model.parameters(), lr=1e-2)
        for s in range(3):
            opt.zero_grad()
            x = torch.randn(16, 64, generator=torch.Generator().manual_seed(s)).to(device)
            model(x).square().mean().backward()
            opt.step()
        torch.cuda.synchronize(device)
        return [p.detach().cpu() for p in model.parameters()]

    with torch.cuda.device(1):
        reference = steps("cuda:1")
    with torch.cuda.device(0):
        moved = steps("cuda:1")
    for a, b in zip(moved, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
