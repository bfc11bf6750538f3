"""Hand-written autograd Functions of the residual MLP memory == the plain expressions they replace
(gradcheck in float64), including their torch.compile and autocast paths."""

import pytest
import torch
import torch.nn.functional as F

from nl_layers.memory import mlp
from nl_layers.ops.fast_weights import grouped_linear as gl

f64 = dict(dtype=torch.float64)


def _shared_read_ref(x, w_in, w_out):
    xe = x.expand(w_in.shape[0], -1, -1)
    return xe + F.silu(xe @ w_in.transpose(1, 2)) @ w_out.transpose(1, 2)


@pytest.mark.parametrize("groups", [1, 3])
def test_shared_silu_read_equals_the_grouped_compose(monkeypatch, groups):
    monkeypatch.setattr(gl, "ROWS_PER_SLICE", 4)  # the weight gradients in row slices (12 rows: 3)
    torch.manual_seed(0)
    x = torch.randn(12, 5, **f64, requires_grad=True)
    w_in = torch.randn(groups, 7, 5, **f64, requires_grad=True)
    w_out = torch.randn(groups, 5, 7, **f64, requires_grad=True)
    torch.testing.assert_close(mlp.shared_silu_read(x, w_in, w_out), _shared_read_ref(x, w_in, w_out))
    assert torch.autograd.gradcheck(mlp.shared_silu_read, (x, w_in, w_out))
    gy = torch.randn(groups, 12, 5, **f64)
    ours = torch.autograd.grad(mlp.shared_silu_read(x, w_in, w_out), (x, w_in, w_out), gy)
    ref = torch.autograd.grad(_shared_read_ref(x, w_in, w_out), (x, w_in, w_out), gy)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_shared_silu_read_compiled_and_under_autocast():
    torch.manual_seed(0)
    leaves = [torch.randn(8, 4, **f64), torch.randn(2, 6, 4, **f64), torch.randn(2, 4, 6, **f64)]
    ref = torch.autograd.grad(_shared_read_ref(*[t.requires_grad_() for t in leaves]).square().sum(), leaves)
    leaves = [t.detach().requires_grad_() for t in leaves]
    out = torch.compile(lambda *a: mlp.shared_silu_read(*a).square().sum(), fullgraph=True, backend="eager")(*leaves)
    for a, b in zip(torch.autograd.grad(out, leaves), ref):
        torch.testing.assert_close(a, b)
    x, w_in, w_out = (t.detach().float().requires_grad_() for t in leaves)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mlp.shared_silu_read(x, w_in, w_out)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == w_in.grad.dtype == w_out.grad.dtype == torch.float32


def _factors_ref(memory, params, k, v, dgd):
    """The plain expression: factors, then their squared norms in the generic node."""
    from nl_layers._modules import factored_grad_sq_norm

    facs, residual = mlp.ResidualMLPMemory.factors(memory, params, k, v, dgd)
    g, rho = factored_grad_sq_norm(facs.values(), residual)
    return facs["w_in"][0], facs["w_out"][0], facs["w_out"][1], g, rho


@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("dgd", [False, True])
@pytest.mark.parametrize("per_copy", [False, True])
def test_silu_factors_equal_factors_and_their_norms(monkeypatch, dgd, per_copy, kernels):
    """Values and gradients (gradcheck, and with some outputs unused), on the torch paths and with the
    element-wise kernels forced (compiled on a CUDA machine, the interpreter on a CPU one)."""
    if kernels:
        from nl_layers.ops.fast_weights import factor_kernels

        monkeypatch.setattr(factor_kernels, "kernel_ok", lambda *ts: True)
    dev = dict(f64, device="cuda" if kernels and torch.cuda.is_available() else "cpu")  # compiled kernels need CUDA tensors
    torch.manual_seed(0)
    memory = mlp.ResidualMLPMemory(4, 6).double()
    n = 3
    k, v = torch.randn(n, 5, 4, **dev, requires_grad=True), torch.randn(n, 5, 4, **dev, requires_grad=True)
    shape = (n,) if per_copy else ()
    w_in = torch.randn(*shape, 6, 4, **dev, requires_grad=True)
    w_out = torch.randn(*shape, 4, 6, **dev, requires_grad=True)

    def ours(k, v, w_in, w_out):
        facs, g, rho = memory.factors_and_norms({"w_in": w_in, "w_out": w_out}, k, v, dgd)
        assert facs["w_in"][1] is k
        return facs["w_in"][0], facs["w_out"][0], facs["w_out"][1], g, rho

    def ref(k, v, w_in, w_out):
        return _factors_ref(memory, {"w_in": w_in, "w_out": w_out}, k, v, dgd)

    leaves = (k, v, w_in, w_out)
    for a, b in zip(ours(*leaves), ref(*leaves)):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(ours, leaves)
    for used in ([0, 1, 2, 3, 4], [3, 4], [0, 2], [1], [4]):  # some outputs unused: their gradients are None
        outs_a, outs_b = ours(*leaves), ref(*leaves)
        weights = [torch.randn_like(outs_a[i]) for i in used]
        ga = torch.autograd.grad([outs_a[i] for i in used], leaves, weights, allow_unused=True)
        gb = torch.autograd.grad([outs_b[i] for i in used], leaves, weights, allow_unused=True)
        for a, b in zip(ga, gb):
            if b is None:
                assert a is None or not a.abs().any()
            else:
                torch.testing.assert_close(a, b)


def test_silu_factors_compiled_and_under_autocast():
    torch.manual_seed(0)
    memory = mlp.ResidualMLPMemory(4, 6).double()
    leaves = [torch.randn(2, 5, 4, **f64), torch.randn(2, 5, 4, **f64), torch.randn(6, 4, **f64), torch.randn(4, 6, **f64)]

    def loss(fn, k, v, w_in, w_out):
        b, l, h, g, rho = fn(k, v, w_in, w_out)
        return b.sum() + l.square().sum() + h.sin().sum() + g.sum() + rho.cos().sum()

    def ours(k, v, w_in, w_out):
        facs, g, rho = memory.factors_and_norms({"w_in": w_in, "w_out": w_out}, k, v, True)
        return facs["w_in"][0], facs["w_out"][0], facs["w_out"][1], g, rho

    leaves = [t.requires_grad_() for t in leaves]
    ref = torch.autograd.grad(loss(lambda *a: _factors_ref(memory, {"w_in": a[2], "w_out": a[3]}, a[0], a[1], True), *leaves), leaves)
    out = torch.compile(lambda *a: loss(ours, *a), fullgraph=True, backend="eager")(*leaves)
    for a, b in zip(torch.autograd.grad(out, leaves), ref):
        torch.testing.assert_close(a, b)
    leaves = [t.detach().float().requires_grad_() for t in leaves]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        b, l, h, g, rho = ours(*leaves)
    (b.float().sum() + l.float().sum() + h.float().sum() + g.float().sum() + rho.float().sum()).backward()
    assert all(t.grad.dtype == torch.float32 for t in leaves)


def _heads_ref(x, w_q, heads):
    from nl_layers._modules import l2_normalize

    b, t, dim = x.shape
    xq = l2_normalize(torch.cat([x, x @ w_q.t()], -1).view(b, t, 2, heads, dim // heads))
    return xq.permute(2, 0, 3, 1, 4).reshape(2, b * heads, t, dim // heads).unbind(0)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_normalized_heads_equal_the_stacked_normalisation(compiled, transposed):
    from nl_layers._modules import normalized_heads

    torch.manual_seed(0)
    # (B, T, D), contiguous (as from the Triton convolution) or transposed (as from the torch one)
    x = torch.randn(2, 8, 5, **f64).transpose(1, 2) if transposed else torch.randn(2, 5, 8, **f64)
    x[0, 1, :4] = 0.0  # a zero head: its norm is clamped (no gradient through the norm)
    x = x.requires_grad_()
    w_q = torch.randn(8, 8, **f64, requires_grad=True)
    fn = (lambda x, w: normalized_heads(x, w, 2))
    if compiled:
        fn = torch.compile(fn, fullgraph=True, backend="eager")
    ours, ref = fn(x, w_q), _heads_ref(x, w_q, 2)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    gy = [torch.randn_like(t) for t in ref]
    for used in ([0, 1], [0], [1]):
        ga = torch.autograd.grad([ours[i] for i in used], (x, w_q), [gy[i] for i in used], retain_graph=True, allow_unused=True)
        gb = torch.autograd.grad([ref[i] for i in used], (x, w_q), [gy[i] for i in used], retain_graph=True, allow_unused=True)
        for a, b, leaf in zip(ga, gb, (x, w_q)):  # None: a zero gradient
            torch.testing.assert_close(torch.zeros_like(leaf) if a is None else a, torch.zeros_like(leaf) if b is None else b)
    if not compiled:
        assert torch.autograd.gradcheck(lambda x, w: normalized_heads(x, w, 2), (x.detach().clone().requires_grad_(), w_q))


@pytest.mark.parametrize("compiled", [False, True])
def test_pair_normalize_equals_normalising_the_stack(compiled):
    from nl_layers._modules import l2_normalize
    from nl_layers.self_modifying import _PairNormalize

    torch.manual_seed(0)
    y = torch.randn(6, 5, 3, **f64)
    y[1, 2] = 0.0  # a zero key: its norm is clamped
    y = y.requires_grad_()
    fn = lambda y: _PairNormalize.apply(y, 1e-6)[:2]  # noqa: E731
    if compiled:
        fn = torch.compile(fn, fullgraph=True, backend="eager")
    ours, ref = fn(y), l2_normalize(y).split(3)
    for used in ([0, 1], [0], [1]):
        gys = [torch.randn_like(ref[i]) for i in used]
        ga = torch.autograd.grad([ours[i] for i in used], y, gys, retain_graph=True)[0]
        gb = torch.autograd.grad([ref[i] for i in used], y, gys, retain_graph=True)[0]
        torch.testing.assert_close(ga, gb)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    if not compiled:
        assert torch.autograd.gradcheck(fn, (y,))


@pytest.mark.parametrize("compiled", [False, True])
def test_shared_silu_read_with_heads_equals_the_dot_products(monkeypatch, compiled):
    monkeypatch.setattr(gl, "ROWS_PER_SLICE", 4)
    torch.manual_seed(0)
    x = torch.randn(12, 5, **f64, requires_grad=True)
    w_in = torch.randn(3, 7, 5, **f64, requires_grad=True)  # G h + R = 23 columns: the first product's rows padded
    w_out = torch.randn(3, 5, 7, **f64, requires_grad=True)
    heads = torch.randn(2, 5, **f64, requires_grad=True)
    fn = lambda *a: mlp.shared_silu_read(*a)  # noqa: E731
    if compiled:
        fn = torch.compile(fn, fullgraph=True, backend="eager")

    def ref(x, w_in, w_out, heads):
        y = _shared_read_ref(x, w_in, w_out)
        return y[:1], (y[1:] * heads[:, None, :]).sum(-1)

    leaves = (x, w_in, w_out, heads)
    ours, want = fn(*leaves), ref(*leaves)
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, b)
    for used in ([0, 1], [0], [1]):
        gys = [torch.randn_like(want[i]) for i in used]
        ga = torch.autograd.grad([ours[i] for i in used], leaves, gys, retain_graph=True, allow_unused=True)
        gb = torch.autograd.grad([want[i] for i in used], leaves, gys, retain_graph=True, allow_unused=True)
        for a, b, leaf in zip(ga, gb, leaves):  # None: a zero gradient
            torch.testing.assert_close(torch.zeros_like(leaf) if a is None else a, torch.zeros_like(leaf) if b is None else b)
    gys = [torch.randn_like(t) for t in want]  # only the heads' gradient asked for (x^T dc without dW_in)
    ga = torch.autograd.grad(ours, heads, gys, retain_graph=True)
    torch.testing.assert_close(ga[0], torch.autograd.grad(want, heads, gys, retain_graph=True)[0])
    if not compiled:
        assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_heads_gates_and_read_under_autocast_keep_input_dtypes(x_dtype):
    from nl_layers._modules import normalized_heads
    from nl_layers.self_modifying import _PairNormalize

    torch.manual_seed(0)
    x, w_q = torch.randn(2, 5, 8, dtype=x_dtype, requires_grad=True), torch.randn(8, 8, requires_grad=True)
    y = torch.randn(8, 5, 4, requires_grad=True)
    w_in, w_out, heads = torch.randn(4, 6, 4, requires_grad=True), torch.randn(4, 4, 6, requires_grad=True), torch.randn(2, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xh, q = normalized_heads(x, w_q, 2)
        outs = _PairNormalize.apply(y.to(torch.bfloat16), 1e-6)[:2]
        kv, dots = mlp.shared_silu_read(y.reshape(-1, 4), w_in, w_out, heads)
    loss = xh.float().sum() + q.float().square().sum() + sum(o.float().sum() for o in outs)
    (loss + kv.float().square().sum() + dots.float().sum()).backward()
    assert q.dtype == torch.bfloat16 and x.grad.dtype == x_dtype and w_q.grad.dtype == torch.float32
    assert y.grad.dtype == w_in.grad.dtype == w_out.grad.dtype == heads.grad.dtype == torch.float32


def _token_read_inputs(per_copy, dtype=torch.float64, n=2, length=6, d=3, hid=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)  # noqa: E731
    shape = (n,) if per_copy else ()
    return [make(n, length, length).tril(), make(n, length, hid), make(n, length, d), make(n, length, d),
            make(n, length, hid), make(n, length, d), make(*shape, hid, d), make(*shape, d, hid)]


def _token_read_ref(mixing, l1, r1, l2, r2, q, w_in, w_out):
    """The plain expression: each layer as rank1_read_tokens' torch path, composed."""
    z = q @ w_in.transpose(-1, -2) + (mixing * (q @ r1.transpose(-1, -2))) @ l1
    h = F.silu(z)
    return q + h @ w_out.transpose(-1, -2) + (mixing * (h @ r2.transpose(-1, -2))) @ l2


def _token_read(mixing, l1, r1, l2, r2, q, w_in, w_out):
    return mlp.silu_token_read(mixing, {"w_in": (l1, r1), "w_out": (l2, r2)}, {"w_in": w_in, "w_out": w_out}, q)


@pytest.mark.parametrize("per_copy", [False, True])
def test_silu_token_read_equals_the_composed_layers(per_copy):
    leaves = [t.requires_grad_() for t in _token_read_inputs(per_copy)]
    torch.testing.assert_close(_token_read(*leaves), _token_read_ref(*leaves))
    assert torch.autograd.gradcheck(_token_read, leaves)
    gy = torch.randn_like(leaves[5])
    for a, b in zip(torch.autograd.grad(_token_read(*leaves), leaves, gy), torch.autograd.grad(_token_read_ref(*leaves), leaves, gy)):
        torch.testing.assert_close(a, b)
    ours = torch.autograd.grad(_token_read(*leaves), leaves[5:6], gy)  # only q's gradient asked for
    torch.testing.assert_close(ours[0], torch.autograd.grad(_token_read_ref(*leaves), leaves[5:6], gy)[0])


@pytest.mark.parametrize("per_copy", [False, True])
def test_silu_token_read_with_the_read_kernel(monkeypatch, per_copy):
    """The read kernel forced on (compiled on CUDA, the interpreter on CPU), float32: values and every
    gradient equal the plain expression's; mixing's gradient on and below the diagonal, zero above."""
    from nl_layers.ops.fast_weights import read_kernels

    monkeypatch.setattr(read_kernels, "kernel_ok", lambda *ts: True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = [t.to(device) for t in _token_read_inputs(per_copy, torch.float32, length=70, d=5, hid=7)]
    gy = torch.randn_like(inputs[5])
    results = []
    for fn in (_token_read, _token_read_ref):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y = fn(*leaves)
        results.append([y.detach(), *torch.autograd.grad(y, leaves, gy)])
    got, want = results
    assert bool((got[1].triu(1) == 0).all())
    want[1] = want[1].tril()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_silu_token_read_compiled_and_under_autocast():
    """Compiled (fullgraph) it equals the plain expression; under autocast the memory declines the
    fused node (read_tokens None: the engine composes the layers) and the engine's read still runs."""
    leaves = [t.requires_grad_() for t in _token_read_inputs(False)]
    ref = torch.autograd.grad(_token_read_ref(*leaves).square().sum(), leaves)
    out = torch.compile(lambda *a: _token_read(*a).square().sum(), fullgraph=True, backend="eager")(*leaves)
    for a, b in zip(torch.autograd.grad(out, leaves), ref):
        torch.testing.assert_close(a, b)
    memory = mlp.ResidualMLPMemory(3, 4)
    mixing, l1, r1, l2, r2, q, w_in, w_out = (t.detach().float() for t in leaves)
    args = (mixing, {"w_in": (l1, r1), "w_out": (l2, r2)}, {"w_in": w_in, "w_out": w_out}, q)
    assert memory.read_tokens(*args) is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert memory.read_tokens(*args) is None


def test_neural_memory_same_with_and_without_the_fused_read(monkeypatch):
    """NeuralMemory (token form, fresh and streamed) with the fused read equals the layer-by-layer
    compose, float64: outputs and every gradient."""
    import nl_layers

    torch.manual_seed(0)
    layer = nl_layers.NeuralMemory(8, heads=2, chunk_size=4).double()
    x = torch.randn(2, 11, 8, **f64)
    calls = []

    def run():
        xs = x.clone().requires_grad_()
        y, st = layer(xs[:, :5])
        y2, _ = layer(xs[:, 5:], st)
        out = torch.cat([y, y2], 1)
        return [out.detach(), *torch.autograd.grad(out.sin().sum(), [xs, *layer.parameters()])]

    fused = mlp.ResidualMLPMemory.read_tokens
    monkeypatch.setattr(mlp.ResidualMLPMemory, "read_tokens", lambda *a: calls.append(1) or fused(*a))
    got = run()
    assert calls
    monkeypatch.setattr(mlp.ResidualMLPMemory, "read_tokens", lambda *a: None)
    for a, b in zip(got, run()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("with_heads", [False, True])
def test_shared_silu_read_with_the_activation_kernels(monkeypatch, with_heads):
    """The read with its activation passes forced onto the kernels (compiled on a CUDA machine, the
    interpreter on a CPU one): values and gradcheck against the plain expression (padded rows)."""
    from nl_layers.ops.fast_weights import shared_read_kernels

    monkeypatch.setattr(shared_read_kernels, "kernel_ok", lambda *ts: True)
    dev = dict(f64, device="cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    x = torch.randn(9, 5, **dev, requires_grad=True)
    w_in = torch.randn(3, 7, 5, **dev, requires_grad=True)
    w_out = torch.randn(3, 5, 7, **dev, requires_grad=True)
    leaves = (x, w_in, w_out) + ((torch.randn(2, 5, **dev, requires_grad=True),) if with_heads else ())
    y = _shared_read_ref(x, w_in, w_out)
    ours = mlp.shared_silu_read(*leaves)
    if with_heads:
        torch.testing.assert_close(ours[0], y[:1])
        torch.testing.assert_close(ours[1], (y[1:] * leaves[3][:, None, :]).sum(-1))
    else:
        torch.testing.assert_close(ours, y)
    assert torch.autograd.gradcheck(lambda *a: mlp.shared_silu_read(*a), leaves)
