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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("m, g, r, hid, width", [(37, 3, 2, 5, 7), (8, 2, 1, 4, 1), (5, 1, 1, 3, 0), (0, 2, 1, 4, 3)])
def test_outer_heads_and_tail_columns(m, g, r, hid, width, dtype):
    """The last r memories' dh as outer products a_r b_r^T, and the tail columns (dc^T, then zeros)
    of the read's padded buffer, in the same launch: against the torch path and the full dh."""
    gen = torch.Generator().manual_seed(1)
    zx = torch.randn(m, g * hid + width, generator=gen, dtype=dtype).to(DEVICE)
    z = zx[:, : g * hid].view(m, g, hid)
    dh = torch.randn(g - r, m, hid, generator=gen, dtype=dtype).to(DEVICE)
    a = torch.randn(r, m, generator=gen, dtype=dtype).to(DEVICE)
    b = torch.randn(r, hid, 1, generator=gen, dtype=dtype).to(DEVICE)[..., 0]  # as the read's u[..., 0]
    c = None if width < r else a  # the tail takes dc^T when it has room (the read's own case: c = a)
    outs = []
    for impl in ("triton", "torch"):
        buf = torch.full((m, g * hid + width), float("nan"), dtype=dtype, device=DEVICE)
        tail = (buf[:, g * hid :], c) if width else None
        sk.silu_backward_token_major(dh, z, out=buf[:, : g * hid].view(m, g, hid), impl=impl, outer=(a, b), tail=tail)
        outs.append(buf)
    torch.testing.assert_close(*outs, rtol=TOL[dtype], atol=TOL[dtype])
    full = torch.cat([dh, a[:, :, None] * b[:, None, :]])
    want = sk.silu_backward_token_major(full, z, impl="torch").reshape(m, g * hid)
    torch.testing.assert_close(outs[0][:, : g * hid], want, rtol=TOL[dtype], atol=TOL[dtype])
    tail_want = torch.zeros(m, width, dtype=dtype, device=DEVICE)
    if c is not None:
        tail_want[:, :r] = c.t()
    torch.testing.assert_close(outs[0][:, g * hid :], tail_want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("m, g, r, hid", [(37, 3, 2, 5), (8, 1, 1, 4), (0, 2, 1, 3)])
def test_forward_dot_products_of_the_head_memories(m, g, r, hid, dtype):
    """c_r = base_r + h_r . u_r from the forward kernel's pass, base a strided view of the read's
    buffer (its columns after z, transposed): against the torch path and the plain expression."""
    gen = torch.Generator().manual_seed(2)
    zx = torch.randn(m, g * hid + r + 3, generator=gen, dtype=dtype).to(DEVICE)
    z, base = zx[:, : g * hid].view(m, g, hid), zx[:, g * hid : g * hid + r].t()
    u = torch.randn(r, hid, 1, generator=gen, dtype=dtype).to(DEVICE)[..., 0]
    (h, c), (h_ref, c_ref) = (sk.silu_memory_major(z, impl=impl, dots=(u, base)) for impl in ("triton", "torch"))
    assert c.shape == (r, m)
    torch.testing.assert_close(h, h_ref, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(c, c_ref, rtol=TOL[dtype], atol=TOL[dtype] * hid)
    want = base + (h_ref[g - r:].double() @ u[:, :, None].double())[..., 0].to(dtype)
    torch.testing.assert_close(c, want, rtol=TOL[dtype], atol=TOL[dtype] * hid)


def test_bad_impl():
    with pytest.raises(ValueError, match="impl"):
        sk.silu_memory_major(torch.zeros(2, 1, 3), impl="cuda")
