"""The shared residual-MLP read's activation passes between token-major and memory-major layouts:
the Triton kernels (forced: compiled on a CUDA machine, the interpreter on a CPU one) against the
torch paths, on the padded, sliced layouts the read uses. (The read with the kernels forced against
autograd: tests/nl_layers/test_fused_memory_ops.py.)"""

import pytest
import torch

from nl_layers.ops.fast_weights import shared_read_kernels as sk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the forced kernels run
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("m, g, hid", [(37, 3, 5), (8, 1, 1), (0, 2, 4)])
def test_kernels_match_torch(m, g, hid, dtype):
    """z as the first product's (M, G h + R) buffer with padded rows, sliced to its first G h columns."""
    gen = torch.Generator().manual_seed(0)
    zx = torch.randn(m, g * hid + 3, generator=gen, dtype=dtype).to(DEVICE)
    z = zx[:, : g * hid].view(m, g, hid)
    h = sk.silu_memory_major(z, impl="triton")
    assert h.shape == (g, m, hid) and h.is_contiguous()
    torch.testing.assert_close(h, sk.silu_memory_major(z, impl="torch"), rtol=TOL[dtype], atol=TOL[dtype])
    dh = torch.randn(g, m, hid, generator=gen, dtype=dtype).to(DEVICE)
    outs = []
    for impl in ("triton", "torch"):
        buf = torch.full((m, g * hid + 3), float("nan"), dtype=dtype, device=DEVICE)
        sk.silu_backward_token_major(dh, z, out=buf[:, : g * hid].view(m, g, hid), impl=impl)
        assert buf[:, g * hid :].isnan().all()  # the columns after the slice are not written
        outs.append(buf[:, : g * hid])
    torch.testing.assert_close(*outs, rtol=TOL[dtype], atol=TOL[dtype])
    if dtype == torch.float64:  # silu'(z) dh against autograd
        leaf = z.detach().clone().requires_grad_()
        want = torch.autograd.grad(torch.nn.functional.silu(leaf).transpose(0, 1), leaf, dh)[0]
        torch.testing.assert_close(outs[0].view(m, g, hid), want)


def test_bad_impl():
    with pytest.raises(ValueError, match="impl"):
        sk.silu_memory_major(torch.zeros(2, 1, 3), impl="cuda")
