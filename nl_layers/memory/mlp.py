"""Memory models for the deep (fast-weight) memories: a residual MLP and a plain linear map.

A memory model is an ordinary ``nn.Module`` mapping (..., d) -> (..., d). Its parameters are the
*initial* fast weights (learnable by the outer optimizer); the layers hold one copy per batch row
and head in their state and call the module with :func:`torch.func.functional_call`.

The two built-in models also expose their structure for the closed-form ("analytic") fast path:

- ``compose(x, linear)`` runs the model with every weight product ``W x`` replaced by
  ``linear(name, x)``, so a caller can apply weights that differ per token without building them
  (a residual is passed along, ``linear(name, x, add)`` = add + W x, so a caller can fuse the sum
  into its product);
- ``factors(params, k, v, dgd)`` writes the per-token gradient of 1/2||M(k) - v||^2 at ``params``
  as rank-1 outer products, grad_W = left (x) right per weight matrix (plus, with ``dgd``, the
  delta-gradient-descent decay (W a) a^T of the output layer, a its input, i.e. the gradient of
  1/2||W a||^2 at constant a), and the residual r = M(k) - v (with ``dgd``, r and W a) as a list
  of tensors whose squared norms sum to ||r||^2, which sets the step size (see
  nl_layers/ops/fast_weights/step.py; the engine takes these norms with the gradient's, in one node);
- ``read_tokens(mixing, factors, base, q)`` (the residual MLP, silu): the token-form read of q
  with every token's own weights, both layers in one node (:func:`silu_token_read`);
- ``dgd_layer`` names the layer whose input-direction decay the DGD rule applies, and
  ``layer_inputs(params, k)`` gives the input of every weight matrix for one key.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .._function import Function
from ..ops.fast_weights.factor_kernels import hidden_grads, output_grads, residual_parts, silu_parts, slope_product
from ..ops.fast_weights.grouped_linear import apply_weight as _apply
from ..ops.fast_weights.grouped_linear import weight_grad
from ..ops.fast_weights.shared_read_kernels import silu_backward_token_major, silu_memory_major
from ..ops.fast_weights import read_kernels

_ACTIVATIONS = ("silu", "gelu", "relu", "tanh")


def activation(name: str, z: torch.Tensor) -> torch.Tensor:
    """act(z) alone (one fused op), where the slope is not needed."""
    return {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh}[name](z)


class _SiluAndSlope(Function):
    """h = z s and h' = s (1 + z (1 - s)) with s = sigmoid(z), in few passes, with a hand-written backward.

    silu'' = s (1 - s)(2 + z (1 - 2 s)) = s + (1 - 2 s) h', so dz = dh h' + dh' (s + (1 - 2 s) h').
    """

    @staticmethod
    def forward(z):
        s = torch.sigmoid(z)
        h = z * s
        return h, torch.addcmul(s, h, 1 - s), s  # h' = s + z s (1 - s); s only for the backward

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, slope, s = output
        ctx.mark_non_differentiable(s)
        ctx.set_materialize_grads(False)  # no zero gradient for s (nor for an unused h or h')
        ctx.save_for_backward(s, slope)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_h, g_slope, _):
        s, slope = ctx.saved_tensors
        if g_slope is None:
            return None if g_h is None else g_h * slope
        curvature = torch.addcmul(s, torch.rsub(s, 1, alpha=2), slope).mul_(g_slope)  # silu''(z) dh'
        return curvature if g_h is None else curvature.addcmul_(g_h, slope)


def silu_and_slope(z: torch.Tensor):
    """silu(z) and silu'(z) (as ``activation_and_slope("silu", z)`` in autograd terms, with fewer passes).

    Example:
        >>> z = torch.randn(5, dtype=torch.float64)
        >>> h, slope = silu_and_slope(z)
        >>> bool(torch.allclose(slope, torch.func.vmap(torch.func.grad(F.silu))(z)))
        True
    """
    h, slope, _ = _SiluAndSlope.apply(z)
    return h, slope


def _first_weights(w_in: torch.Tensor, heads: torch.Tensor | None, rows: int | None = None) -> torch.Tensor:
    """The first product's weights (G h, d), with the R head vectors as R more rows (G h + R, d)
    and, given ``rows``, zero rows up to that many (in the same ``cat``)."""
    flat = w_in.reshape(-1, w_in.shape[-1])
    parts = [flat] if heads is None else [flat, heads.to(flat.dtype)]
    used = sum(t.shape[0] for t in parts)
    if rows is not None and rows > used:
        parts.append(flat.new_zeros(rows - used, flat.shape[1]))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _autocast_on(t: torch.Tensor) -> bool:
    """Whether autocast is enabled for t's device (a meta tensor has none)."""
    return t.device.type != "meta" and torch.is_autocast_enabled(t.device.type)


def _padded_width(cols: int) -> int:
    """``cols`` rounded up to a multiple of 16: the width of the shared read's (M, G h + R) matrices.
    Triton proves such row strides divisible and loads whole vectors (a stride like 770 makes every
    element its own load), and cuBLAS keeps its narrow-alignment kernels for any extent that is not
    a multiple of 4 (770 columns: whatever the row stride), so the extra columns are real, and zero."""
    return -(-cols // 16) * 16


class _SharedSiluRead(Function):
    """y_g = x + h_g W_out,g^T with h_g = silu(z_g), z = x [W_in,1; ...; W_in,G]^T, for G residual MLPs
    reading one x (M, d): y (G, M, d), with a hand-written backward; given R head vectors w_r, the
    last R outputs only as their dot products c_r = y_r . w_r = x . w_r + h_r . u_r, u_r = W_out,r^T w_r
    (those y_r are never formed).

    Forward: z (M, G h) in one product (x is not repeated; with heads the dot products x . w_r come
    from the same product, as R more rows of its weights [W_in,g; w_r]), h stored memory-major (G, M, h),
    y by baddbmm (the residual in the product). Backward: dh_g = dy_g W_out,g (dh_r = dc_r u_r^T),
    dz = silu'(z) dh (stored (M, G h), with dc^T as R more columns), dx = sum_g dy_g + [dz, dc^T] [W_in,g; w_r]
    (one product over K = G h + R: no per-group input gradients, no accumulation add),
    [dW_in; (x^T dc)^T] = [dz, dc^T]^T x and dW_out,g = dy_g^T h_g (in row slices, see weight_grad),
    dW_out,r = w_r (h_r^T dc_r)^T, dw_r = x^T dc_r + W_out,r (h_r^T dc_r). In eager mode the (M, G h + R)
    matrices carry zero columns up to a multiple of 16 (and the first weights as many zero rows: the
    products are unchanged, and no extent such as 770 holds cuBLAS to its narrow-alignment kernels);
    the activation's passes between the two layouts are Triton kernels on CUDA
    (:mod:`~nl_layers.ops.fast_weights.shared_read_kernels`).
    """

    @staticmethod
    def forward(x, w_in, w_out, heads):
        g, hid, d = w_in.shape
        m = x.shape[0]
        r = 0 if heads is None else heads.shape[0]
        # (M, G h [+ R] [+ zero columns]): z and, with heads, x . w_r in the R columns after it; in eager
        # mode padded with zero columns to a multiple of 16 (see _padded_width; the first weights gain
        # zero rows); under torch.compile (no custom kernels there) just (M, G h + R)
        eager = not torch.compiler.is_compiling()
        first = _first_weights(w_in, heads, _padded_width(g * hid + r) if eager else None)
        zx = x @ first.t()
        z = zx[:, : g * hid].view(m, g, hid)
        p = g - r
        u = None if heads is None else w_out[p:].transpose(1, 2) @ heads[:, :, None]  # (R, h, 1)
        base = None if heads is None else zx[:, g * hid : g * hid + r].t()  # x . w_r (R, M)
        c = None
        if not eager:  # no out= (torch.compile traces this path)
            h = F.silu(z.transpose(0, 1)).contiguous()
        elif heads is None:
            h = silu_memory_major(z)  # silu and the transpose in one pass
        else:  # and the heads' dot products c_r = x . w_r + h_r . u_r in the same pass
            h, c = silu_memory_major(z, dots=(u[:, :, 0], base))
        y = torch.baddbmm(x.expand(p, m, d), h[:p], w_out[:p].transpose(1, 2))
        if heads is None:
            return y, None, zx, h, None
        if c is None:
            c = torch.baddbmm(base[:, :, None], h[p:], u)[..., 0]  # (R, M)
        return y, c, zx, h, u

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, _, z, h, u = output
        ctx.mark_non_differentiable(z, h, *(() if u is None else (u,)))
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs, z, h, u)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gc, *_):
        x, w_in, w_out, heads, z, h, u = ctx.saved_tensors
        g, hid, d = w_in.shape
        m = x.shape[0]
        p = g if heads is None else g - heads.shape[0]
        gc = None if heads is None else gc
        if gy is None and gc is None:
            return None, None, None, None
        dt = h.dtype if gy is None else gy.dtype
        compiling = torch.compiler.is_compiling()
        z = z[:, : g * hid].view(m, g, hid)
        r = 0 if gc is None else heads.shape[0]  # dz gains dc^T as R more columns (the heads' rows of the first product)
        # dh of the full outputs (G - R, M, h); the heads' dh_r = dc_r u_r^T are outer products
        gh = gy @ w_out[:p].to(dt) if gy is not None else h.new_zeros(p, m, hid, dtype=dt)
        outer = None if heads is None else (
            gc.to(dt) if r else h.new_zeros(heads.shape[0], m, dtype=dt), u.to(dt)[:, :, 0])
        if compiling:
            if outer is not None:
                gh = torch.cat([gh, outer[0][:, :, None] * outer[1][:, None, :]])
            gz = torch.ops.aten.silu_backward(gh.transpose(0, 1), z).reshape(m, g * hid)
            if r:
                gz = torch.cat([gz, gc.t().to(gz.dtype)], 1)
        else:  # as the forward's z: dc^T, then zero columns to a multiple of 16 (zero rows of the weights below)
            gz = z.new_empty(m, _padded_width(g * hid + r))
            tail = (gz[:, g * hid :], gc.to(gz.dtype) if r else None) if gz.shape[1] > g * hid else None
            silu_backward_token_major(gh, z, out=gz[:, : g * hid].view(m, g, hid), outer=outer, tail=tail)
        gx = gw_in = gw_out = gheads = None
        first = _first_weights(w_in, heads if r else None, gz.shape[1])
        if ctx.needs_input_grad[0]:
            base = None if gy is None else gy[0] if p == 1 else gy.sum(0)
            w = first.to(gz.dtype)  # (sum_g dy_g) + dz [W_in; w]
            if base is None:
                gx = gz @ w
            elif p > 1 and base.dtype == gz.dtype and not compiling:  # the sum is ours: the product into it
                gx = base.addmm_(gz, w)
            else:
                gx = torch.addmm(base.to(gz.dtype), gz, w)
            gx = gx.to(x.dtype)
        gw_first = None
        if ctx.needs_input_grad[1] or (r and ctx.needs_input_grad[3]):  # [dW_in; x^T dc] in one product
            gw_first = weight_grad(gz[None], x[None].to(gz.dtype))[0]
        if ctx.needs_input_grad[1]:
            gw_in = gw_first[: g * hid].view(g, hid, d).to(w_in.dtype)
        # (R, 1, h): (h_r^T dc_r)^T, a reduction over the M rows: in row slices, as the weight gradients
        hc = None if gc is None else weight_grad(gc.to(h.dtype)[:, :, None], h[p:])
        if ctx.needs_input_grad[2]:
            gws = [torch.zeros_like(w_out[:p]) if gy is None else weight_grad(gy, h[:p].to(gy.dtype)).to(w_out.dtype)]
            if heads is not None:
                gws.append(torch.zeros_like(w_out[p:]) if gc is None else heads[:, :, None] * hc.to(heads.dtype))
            gw_out = gws[0] if len(gws) == 1 else torch.cat(gws)
        if r and ctx.needs_input_grad[3]:
            gheads = gw_first[g * hid : g * hid + r].to(x.dtype) + (hc.to(w_out.dtype) @ w_out[p:].transpose(1, 2))[:, 0].to(x.dtype)
            gheads = gheads.to(heads.dtype)
        return gx, gw_in, gw_out, gheads


def shared_silu_read(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, heads: torch.Tensor | None = None):
    """x + W_out,g silu(W_in,g x) for x (M, d) and G memories' weights w_in (G, h, d), w_out (G, d, h):
    (G, M, d), as ``grouped_linear(h, w_out, x.expand(G, M, d))`` with ``h = silu(grouped_linear(x.expand(G, M, d), w_in))``
    in fewer passes (:class:`_SharedSiluRead`). Given ``heads`` (R, d): the first G - R outputs and
    the last R outputs' dot products with the heads, (R, M), without forming those outputs.

    Example:
        >>> x, w_in, w_out = torch.randn(5, 4), torch.randn(2, 8, 4), torch.randn(2, 4, 8)
        >>> ref = x + F.silu(x @ w_in.transpose(1, 2)) @ w_out.transpose(1, 2)
        >>> bool(torch.allclose(shared_silu_read(x, w_in, w_out), ref, atol=1e-5))
        True
        >>> y, c = shared_silu_read(x, w_in, w_out, heads=torch.ones(1, 4))
        >>> bool(torch.allclose(y, ref[:1], atol=1e-5)), bool(torch.allclose(c, ref[1:].sum(-1), atol=1e-5))
        (True, True)
    """
    y, c = _SharedSiluRead.apply(x, w_in, w_out, heads)[:2]
    return y if heads is None else (y, c)


class _SiluTokenRead(Function):
    """The token-form read of the residual MLP (silu), both layers in one node: for a causal mixing
    matrix M (N, L, L), the updates' factors (L1, R1) of W_in and (L2, R2) of W_out and base weights
    W_in, W_out (one for all copies or one per copy),

        z = q W_in^T + (M * (q R1^T)) L1,   h = silu(z),   y = q + h W_out^T + (M * (h R2^T)) L2

    (each layer as :func:`~..ops.fast_weights.scan.rank1_read_tokens`). Backward, for dy = g, with
    S1 = q R1^T, S2 = h R2^T: G2 = g L2^T, dS2 = G2 * M, dh = g W_out + dS2 R2, dz = silu'(z) dh,
    G1 = dz L1^T, dS1 = G1 * M, dM = G2 * S2 + G1 * S1 (the second product added in the same pass:
    no accumulation add across the layers), dq = g + dz W_in + dS1 R1 (one product added to
    another), dL_i = (M * S_i)^T (g or dz), dR1 = dS1^T q, dR2 = dS2^T h, dW_in = dz^T q, dW_out = g^T h.
    On CUDA the two element-wise passes are :func:`~..ops.fast_weights.read_kernels.read_grads`
    (M taken as zero above the diagonal: no gradient there); elsewhere the plain products (dM
    above the diagonal then equals the plain expression's, G * S).
    """

    @staticmethod
    def forward(mixing, l1, r1, l2, r2, q, w_in, w_out):
        # eager: in place (the product is ours; out of place copies it first); compiling: out of place
        # (torch 2.11's dynamo loses the gradient of an output written in place in a Function's forward)
        add = torch.baddbmm if torch.compiler.is_compiling() else torch.Tensor.baddbmm_
        s1 = q @ r1.transpose(-1, -2)
        m1 = mixing * s1
        z = add(_apply(w_in, q), m1, l1)
        h = F.silu(z)
        s2 = h @ r2.transpose(-1, -2)
        m2 = mixing * s2
        return add(_apply(w_out, h, q), m2, l2), z, h, s1, m1, s2, m2

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs, *output[1:])

    @staticmethod
    @once_differentiable
    def backward(ctx, g, *_):
        if g is None:
            return (None,) * 8
        mixing, l1, r1, l2, r2, q, w_in, w_out, z, h, s1, m1, s2, m2 = ctx.saved_tensors
        needs = ctx.needs_input_grad
        kernel = read_kernels.kernel_ok(g, mixing, s1)
        g2 = g @ l2.transpose(-1, -2)
        if kernel:
            ds2, dmix = read_kernels.read_grads(g2, mixing, s2, impl="triton")
        else:
            ds2, dmix = g2 * mixing, g2 * s2
        dh = _apply(w_out.transpose(-1, -2), g).baddbmm_(ds2, r2)  # g W_out + dS2 R2
        dz = torch.ops.aten.silu_backward(dh, z)
        g1 = dz @ l1.transpose(-1, -2)
        if kernel:
            ds1, dmix = read_kernels.read_grads(g1, mixing, s1, impl="triton", acc=dmix)
        else:
            ds1 = g1 * mixing
            dmix.addcmul_(g1, s1)
        dq = _apply(w_in.transpose(-1, -2), dz, g).baddbmm_(ds1, r1) if needs[5] else None  # g + dz W_in + dS1 R1
        return (
            dmix if needs[0] else None,
            m1.transpose(-1, -2) @ dz if needs[1] else None,
            ds1.transpose(-1, -2) @ q if needs[2] else None,
            m2.transpose(-1, -2) @ g if needs[3] else None,
            ds2.transpose(-1, -2) @ h if needs[4] else None,
            dq,
            _wgrad(dz, q, w_in) if needs[6] else None,
            _wgrad(g, h, w_out) if needs[7] else None,
        )


def silu_token_read(mixing, facs: dict, base: dict, q: torch.Tensor) -> torch.Tensor:
    """The residual MLP's (silu) read of q (N, L, d) with every token's own weights, W_t = W +
    sum_{r <= t} mixing_tr left_r right_r^T per matrix (factors ``facs`` name -> (left, right),
    base weights ``base``), both layers in one node (:class:`_SiluTokenRead`): as
    ``compose(q, linear)`` with ``linear = rank1_read_tokens(mixing, left, right, x, add, weight=base)``.

    Example:
        >>> from nl_layers.ops.fast_weights.scan import rank1_read_tokens
        >>> n, length, d, hid = 2, 5, 3, 4
        >>> mixing = torch.randn(n, length, length).tril()
        >>> facs = {"w_in": (torch.randn(n, length, hid), torch.randn(n, length, d)),
        ...         "w_out": (torch.randn(n, length, d), torch.randn(n, length, hid))}
        >>> base, q = {"w_in": torch.randn(hid, d), "w_out": torch.randn(d, hid)}, torch.randn(n, length, d)
        >>> lin = lambda nm, x, add=None: rank1_read_tokens(mixing, *facs[nm], x, add, weight=base[nm])
        >>> ref = ResidualMLPMemory(d, hid).compose(q, lin)
        >>> bool(torch.allclose(silu_token_read(mixing, facs, base, q), ref, atol=1e-5))
        True
    """
    return _SiluTokenRead.apply(mixing, *facs["w_in"], *facs["w_out"], q, base["w_in"], base["w_out"])[0]


def activation_and_slope(name: str, z: torch.Tensor):
    """act(z) and act'(z)."""
    if name == "silu":
        return silu_and_slope(z)
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
        return z * cdf, cdf + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    if name == "relu":
        return F.relu(z), (z > 0).to(z.dtype)
    t = torch.tanh(z)
    return t, 1 - t * t


def _apply_mixed(w, x, add=None, beta: int = 1, alpha: int = 1, owned: bool = False):
    """beta add + alpha x w^T (beta, alpha = +-1) at x's precision, w cast to it (autocast leaves mixed
    dtypes); the sum in the product (addmm / baddbmm) where add has x's dtype too, into add itself when
    ``owned`` (a temporary of the caller's, contiguous: the out-of-place product first copies add)."""
    w = w.to(x.dtype)
    if add is not None and add.dtype == x.dtype and not torch.compiler.is_compiling():
        owned = owned and add.is_contiguous()
        if w.ndim == 2:
            if owned:
                add.view(-1, add.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), w.t(), beta=beta, alpha=alpha)
                return add
            flat = torch.addmm(add.reshape(-1, add.shape[-1]), x.reshape(-1, x.shape[-1]), w.t(), beta=beta, alpha=alpha)
            return flat.view(*x.shape[:-1], w.shape[0])
        if x.ndim == 3:
            if owned:
                return add.baddbmm_(x, w.transpose(-1, -2), beta=beta, alpha=alpha)
            return torch.baddbmm(add, x, w.transpose(-1, -2), beta=beta, alpha=alpha)
    prod = _apply(w if alpha == 1 else -w, x)  # (compiling: add may be an incoming gradient of unknown layout; no reshape)
    return prod if add is None else prod + add if beta == 1 else prod - add


def _wgrad(a: torch.Tensor, x: torch.Tensor, w: torch.Tensor, add: torch.Tensor | None = None, alpha: int = 1,
           owned: bool = False) -> torch.Tensor:
    """alpha sum over tokens of a_t x_t^T (+ add) for a weight w: one for all copies (o, i), summed over
    every token of a (N, L, o), x (N, L, i), or one per copy (N, o, i); into add itself when ``owned``
    (a contiguous temporary of the caller's)."""
    x = x.to(a.dtype)
    if add is None or add.dtype != a.dtype or torch.compiler.is_compiling():  # the sum apart
        if w.ndim == 2 and torch.compiler.is_compiling():  # no reshape of a gradient of unknown layout
            out = (a.transpose(-1, -2) @ x).flatten(0, -3).sum(0)
        elif w.ndim == 2:
            out = a.reshape(-1, a.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        else:
            out = a.transpose(-1, -2) @ x
        out = out if alpha == 1 else -out
        return out if add is None else add + out
    owned = owned and add.is_contiguous()
    if w.ndim == 2:
        args = (a.reshape(-1, a.shape[-1]).t(), x.reshape(-1, x.shape[-1]))
        return add.addmm_(*args, alpha=alpha) if owned else torch.addmm(add, *args, alpha=alpha)
    args = (a.transpose(-1, -2), x)
    return add.baddbmm_(*args, alpha=alpha) if owned else torch.baddbmm(add, *args, alpha=alpha)


class _SiluFactors(Function):
    """The residual MLP's per-token gradient factors and squared norms (silu), one node forward and
    backward. With z = W_in k, h = silu(z), p = silu'(z), o = W_out h, e = k + o - v, q = W_out^T e:

        b = q p,  l = e + o (dgd) or e,  g = ||b||^2 ||k||^2 + ||l||^2 ||h||^2,  rho = ||e||^2 (+ ||o||^2 with dgd)

    (grad_{W_in} = b k^T, grad_{W_out} = l h^T). Backward, for gradients B, L, H, dg, drho of b, l, h, g, rho:
    B' = B + 2 dg ||k||^2 b, L' = L + 2 dg ||h||^2 l, E = L' + 2 drho e + (B' p) W_out^T,
    O = E (+ L' + 2 drho o with dgd), H' = H + 2 dg ||l||^2 h + O W_out,
    dz = H' p + (B' q)(s + (1 - 2 s) p) (s = sigmoid(z)), dk = E + 2 dg ||b||^2 k + dz W_in, dv = -E,
    dW_out = e^T (B' p) + O^T h, dW_in = dz^T k: each sum in one operator (no accumulation adds), -E
    formed directly (dv needs no negation; the signs go into the products' alpha and beta). The
    element-wise stages between the products are one pass each on CUDA
    (:mod:`~nl_layers.ops.fast_weights.factor_kernels`).
    """

    @staticmethod
    def forward(dgd, k, v, w_in, w_out):
        z = _apply(w_in, k)
        # norms of k, b, l, h (and e, o with dgd), squared below, at the widest dtype of them (autocast: z may be narrower)
        n2 = z.new_empty(6 if dgd else 4, *k.shape[:-1], dtype=torch.promote_types(torch.promote_types(z.dtype, k.dtype), v.dtype))
        s, h, p = silu_parts(z, n2[3])  # sigmoid(z), silu(z), silu'(z)
        o = _apply(w_out, h)
        e, l = residual_parts(k, o, v, dgd, n2)  # e = k + o - v, l = e + o (dgd) or e
        q = _apply(w_out.transpose(-1, -2), e)  # e W_out
        b = slope_product(q, p, n2[1])
        n2.square_()
        g = n2[0] * n2[1] + n2[2] * n2[3]
        rho = n2[4:].sum(0) if dgd else n2[2]
        return b, l, h, g, rho, s, p, q, o, e if dgd else None, n2

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dgd = inputs[0]
        b, l, h, g, rho, s, p, q, o, e, n2 = output
        ctx.mark_non_differentiable(s, p, q, o, n2, *((e,) if ctx.dgd else ()))
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs[1:], b, l, h, s, p, q, o, e if ctx.dgd else None, n2)

    @staticmethod
    @once_differentiable
    def backward(ctx, gb, gl, gh, gg, grho, *_):
        k, v, w_in, w_out, b, l, h, s, p, q, o, e, n2 = ctx.saved_tensors
        dgd = ctx.dgd
        e = e if dgd else l
        two_g = None if gg is None else (2 * gg)[..., None]
        two_r = None if grho is None else (2 * grho)[..., None]
        # the squared norm's terms join the factors' gradients: B' = B + 2 dg ||k||^2 b, L' = L + 2 dg ||h||^2 l
        gq = gz = None
        if gb is not None or gg is not None:  # B' p and silu''(z) B' q
            gq, gz = hidden_grads(gb, b, p, q, s, None if gg is None else two_g * n2[0, ..., None])
        # L' + 2 drho e and, with dgd, L' + 2 drho o
        base, t = output_grads(gl, l, e, o if dgd else None, None if gg is None else two_g * n2[3, ..., None], two_r)
        # ne = -E: dv = ne needs no negation; E's other uses take the sign in their products
        if gq is not None:
            # -(L' + 2 drho e) - (B' p) W_out^T, into base where it is a temporary of its own (not gl, not t)
            ne = _apply_mixed(w_out, gq, base, beta=-1, alpha=-1, owned=base is not gl and base is not t)
        else:
            ne = None if base is None else -base
        go, go_sign = ne, -1  # O = sign * go: without dgd O = E
        if t is not None:
            go, go_sign = (t if ne is None else t - ne), 1
        if gg is not None:
            c = two_g * n2[2, ..., None]  # (a read's gradient of h may come transposed: the sum in h's layout)
            if gh is None:
                gh = h * c
            else:
                gh = torch.addcmul(gh, h, c, **({} if torch.compiler.is_compiling() else {"out": torch.empty_like(h)}))
        if go is not None:
            gh = _apply_mixed(w_out.transpose(-1, -2), go, gh, alpha=go_sign, owned=gg is not None)  # + O W_out
        if gz is not None:  # silu''(z) B' q + H' p
            if gh is not None:
                gz.addcmul_(gh, p)
        else:
            gz = None if gh is None else gh * p
        gk, k_sign = ne, -1  # dk = k_sign * gk (+ dz W_in)
        if gg is not None:
            c = two_g * n2[1, ..., None]
            gk, k_sign = (k * c, 1) if ne is None else (torch.addcmul(ne, k, c, value=-1.0), -1)
        if gz is not None:
            gk = _apply_mixed(w_in.transpose(-1, -2), gz, gk, beta=k_sign, owned=gg is not None)  # + dz W_in
        elif gk is not None and k_sign == -1:
            gk = -gk
        needs = ctx.needs_input_grad
        gv = None if ne is None or not needs[2] else ne.to(v.dtype)
        gk = None if gk is None or not needs[1] else gk.to(k.dtype)
        gw_in = None if gz is None or not needs[3] else _wgrad(gz, k, w_in).to(w_in.dtype)
        gw_out = None
        if needs[4] and (gq is not None or go is not None):
            first = None if gq is None else _wgrad(e, gq, w_out)
            gw_out = (first if go is None else _wgrad(go, h, w_out, first, alpha=go_sign, owned=True)).to(w_out.dtype)
        return None, gk, gv, gw_in, gw_out


class ResidualMLPMemory(nn.Module):
    """M(x) = x + W_out act(W_in x): the Titans memory (residual MLP, no biases).

    W_out starts small (std ``out_scale / sqrt(hidden)``) so that M starts near the identity.

    Example:
        >>> m = ResidualMLPMemory(dim=8, hidden=16)
        >>> m(torch.randn(3, 8)).shape
        torch.Size([3, 8])
    """

    dgd_layer = "w_out"

    def __init__(self, dim: int, hidden: int, activation: str = "silu", out_scale: float = 0.1):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.w_in = nn.Parameter(torch.randn(hidden, dim) / math.sqrt(dim))
        self.w_out = nn.Parameter(torch.randn(dim, hidden) * (out_scale / math.sqrt(hidden)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compose(x, lambda name, inp, add=None: _apply(getattr(self, name), inp, add))

    def compose(self, x: torch.Tensor, linear) -> torch.Tensor:
        """x + W_out act(W_in x) = linear("w_out", act(linear("w_in", x)), x)."""
        return linear("w_out", activation(self.activation, linear("w_in", x)), x)

    def read_shared(self, x: torch.Tensor, params: dict, heads: torch.Tensor | None = None):
        """x (M, d) read by G memories, params name -> (G, ...): (G, M, d) through :func:`shared_silu_read`
        for silu (with ``heads`` (R, d): the first G - R outputs and the last R outputs' dot products
        with them, (R, M)); None for another activation (the caller then composes)."""
        return shared_silu_read(x, params["w_in"], params["w_out"], heads) if self.activation == "silu" else None

    def read_tokens(self, mixing: torch.Tensor, facs: dict, base: dict, q: torch.Tensor):
        """The token-form read of q with zero start state (see the engine's ``_segment_tokens``)
        through :func:`silu_token_read` for silu (both layers in one node); None for another
        activation, under autocast or for mixed dtypes (the caller then composes layer by layer)."""
        ts = (mixing, q, *base.values(), *(t for pair in facs.values() for t in pair))
        if self.activation != "silu" or _autocast_on(q) or any(t.dtype != q.dtype for t in ts):
            return None
        return silu_token_read(mixing, facs, base, q)

    def factors_and_norms(self, params: dict, k: torch.Tensor, v: torch.Tensor, dgd: bool = False):
        """:meth:`factors` and the squared norms ``factored_grad_sq_norm(factors, residual)`` (g, rho)
        as (factors, g, rho) from one node (:class:`_SiluFactors`) for silu; None for another activation."""
        if self.activation != "silu":
            return None
        b, l, h, g, rho = _SiluFactors.apply(dgd, k, v, params["w_in"], params["w_out"])[:5]
        return {"w_in": (b, k), "w_out": (l, h)}, g, rho

    def layer_inputs(self, params: dict, x: torch.Tensor) -> dict:
        """Input of each weight matrix for key x: {"w_in": x, "w_out": act(W_in x)}."""
        return {"w_in": x, "w_out": activation(self.activation, _apply(params["w_in"], x))}

    def factors(self, params: dict, k: torch.Tensor, v: torch.Tensor, dgd: bool = False):
        """Per-token gradients at shared weights (N, ...) for k, v (N, L, d), as (left, right) factors,
        and the residual's pieces [e] (with ``dgd``, [e, W_out h]): ||r||^2 is the sum of their
        squared norms (N, L)

        grad_{W_out} = e h^T and grad_{W_in} = ((W_out^T e) * act'(z)) k^T with z = W_in k,
        h = act(z), e = M(k) - v. With ``dgd`` the output layer's left factor gains W_out h
        and the residual ||e||^2 gains ||W_out h||^2.
        """
        w_in, w_out = params["w_in"], params["w_out"]
        h, slope = activation_and_slope(self.activation, _apply(w_in, k))
        out = _apply(w_out, h)
        err = k + out - v
        back = (err @ w_out) * slope
        return {"w_in": (back, k), "w_out": (err + out if dgd else err, h)}, [err, out] if dgd else [err]


class LinearMapMemory(nn.Module):
    """M(x) = W x with W initialised to zero: the linear memory of the delta rule, as a module.

    Example:
        >>> LinearMapMemory(4)(torch.ones(2, 4)).abs().sum().item()
        0.0
    """

    dgd_layer = "weight"

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _apply(self.weight, x)

    def compose(self, x: torch.Tensor, linear) -> torch.Tensor:
        return linear("weight", x)

    def layer_inputs(self, params: dict, x: torch.Tensor) -> dict:
        return {"weight": x}

    def factors(self, params: dict, k: torch.Tensor, v: torch.Tensor, dgd: bool = False):
        """grad_W = (W k - v) k^T; with ``dgd`` the left factor gains W k. Also the residual's pieces
        ([W k - v], with ``dgd`` [W k - v, W k])."""
        out = _apply(params["weight"], k)
        err = out - v
        return {"weight": (err + out if dgd else err, k)}, [err, out] if dgd else [err]


def make_memory(kind, dim: int, expansion: float = 2.0) -> nn.Module:
    """Build a memory model from "mlp", "linear" or an ``nn.Module`` mapping (..., dim) -> (..., dim)."""
    if isinstance(kind, nn.Module):
        return kind
    if kind == "mlp":
        return ResidualMLPMemory(dim, max(1, int(round(expansion * dim))))
    if kind == "linear":
        return LinearMapMemory(dim)
    raise ValueError(f"memory must be 'mlp', 'linear' or an nn.Module, got {kind!r}")
