"""``torch.compile(opt.step)`` on a CUDA device, where the fused steps launch compiled Triton
kernels (Newton-Schulz's symmetric products among them) between the compiled graphs: the compiled
step equals the eager one, with dynamo's eager backend for every optimizer and with inductor for
the orthogonalizing ones. (Traced into the graphs, the kernels gave DeepMomentum, DeltaMomentum
and M3 steps off by more than 3e-2 on an H100; ``tests/kernels/test_fused_steps.py`` checks the
call between graphs on the CPU.)"""

import pytest
import torch
from torch import nn

import deepopt

from .helpers import make

pytestmark = pytest.mark.gpu

NAMES = sorted(deepopt.OPTIMIZERS)
#: two runs of one step need not agree bit for bit on CUDA: the kernels that sum over a row (delta
#: momentum's reduction, deep momentum's inner sums) add float32 atomics in the order the programs
#: run, and a sum that moves by an ulp can flip a bf16 rounding of the forget term's inputs; inductor
#: may also fuse the torch ops around the kernels. So the tolerances of the kernel-vs-reference tests.
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def cuda_model(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """Matrices large enough for the kernels' paths (Newton-Schulz on 16-bit symmetric products,
    delta momentum's batched forget terms), a vector and an odd shape."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(96, 160), nn.LayerNorm(160), nn.Tanh(), nn.Linear(160, 160), nn.Tanh(),
                         nn.Linear(160, 7)).to("cuda", dtype)


def loss_of(model: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x = torch.randn(32, 96, generator=g, device="cuda").to(dtype)
    return (model(x).float() - 1).square().mean()


def run_both(name: str, dtype: torch.dtype, backend: str, steps: int = 3):
    compiled_model, eager_model = cuda_model(dtype), cuda_model(dtype)
    opt, opt_eager = make(name, compiled_model), make(name, eager_model)
    step = torch.compile(opt.step, backend=backend)
    for s in range(steps):
        for m, o in ((compiled_model, opt), (eager_model, opt_eager)):
            o.zero_grad()
            loss_of(m, s).backward()
        step()
        opt_eager.step()
    torch.cuda.synchronize()
    return compiled_model, eager_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_compiled_step_equals_eager_on_cuda(name, dtype):
    torch._dynamo.reset()
    compiled, eager = run_both(name, dtype, "eager")
    start = cuda_model(dtype)
    # it stepped (in bf16 some small updates round away, so not every tensor need move)
    assert any(not torch.equal(p, q) for p, q in zip(compiled.parameters(), start.parameters()))
    for p, q in zip(compiled.parameters(), eager.parameters()):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["MuonMemory", "M3", "DeltaMomentum"])
def test_inductor_compiled_step_equals_eager_on_cuda(name, dtype):
    torch._dynamo.reset()
    compiled, eager = run_both(name, dtype, "inductor")
    for p, q in zip(compiled.parameters(), eager.parameters()):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q, rtol=TOL[dtype], atol=TOL[dtype])
