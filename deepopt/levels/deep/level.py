"""Deep momentum (DMGD, paper Eq. 50): the momentum buffer becomes a small network.

The memory of one parameter tensor is ``m_phi(u) = b + sum_j w2_j tanh(w1_j k + b1_j)``, applied
element-wise, with ``k = u / rms(u)`` the gradient normalized per tensor. Its parameters are
``phi = (b, w1, b1, w2)``: ``b`` has the parameter's shape (the linear, per-element part of the
memory) and ``w1, b1, w2`` (``hidden`` numbers each) a shared element-wise MLP. With
``normalize=False`` the MLP reads ``k = u`` itself (for an input already of unit scale, such as a
preconditioned gradient: no pass over the tensor for its RMS). The memory learns by gradient
descent with decay on the inner objective of momentum, the dot product with the incoming gradient
(computed with ``torch.func.grad``):

    L(phi; u) = -<b, u> - (1/n) sum_e u_e MLP(k_e),
    b <- a b - grad_b L,   w2 <- a w2 - eta grad_w2 L,   (w1, b1) <- (w1, b1) - eta grad L,

with ``eta = inner_lr``: the decay ``a`` forgets the memory's content (``b`` and the output layer
``w2``) while the input features ``w1, b1`` learn without decay (decaying them too would silence
the MLP within ~1/(1-a) steps).

Its read-out at the current gradient drives the step: ``W <- W - lr sigma(m_phi(u_t))`` with
``sigma`` in {"identity", "sign", "rms", "ns"}: ``"rms"`` divides the read-out by its root mean
square over the tensor, ``sigma(m) = m / (sqrt(mean(m^2)) + 1e-30)`` (a step of RMS ``lr`` whatever
the gradients' scale, element-wise but for one sum per tensor); ``"ns"`` is Newton-Schulz on
matrices, identity elsewhere.

The foreach path (``write_``/``read_``, what the shell runs on the CPU) computes the inner
gradient analytically in one pass over each tensor, in chunks that stay in cache (``h_ej =
tanh(w1_j k_e + b1_j) = 2 s_ej - 1`` with ``s_ej = sigmoid(2 w1_j k_e + 2 b1_j)``, one sigmoid
per element and hidden unit: torch's CPU tanh has cost from 0.7x (a Xeon) to 6x (an AVX512
EPYC) a sigmoid, so the sigmoid form has no slow case):

    S_0 = sum_e u_e h_ej,  S_1 = sum_e u_e (1 - h_ej^2),  S_2 = sum_e u_e k_e (1 - h_ej^2),
    w2 <- a w2 + eta S_0 / n,  w1 <- w1 + eta w2_old S_2 / n,  b1 <- b1 + eta w2_old S_1 / n,

and the read-out in a second pass; it equals the reference (``torch.func.grad``) to float
rounding (tests: 1e-5 relative in float32, 1e-10 in float64). Its sums and ``w1 k + b1`` are
float32 matmuls, so on CUDA with TF32 on (``torch.backends.cuda.matmul.allow_tf32`` or
``torch.set_float32_matmul_precision("high")``) they carry TF32's 10-bit rounding like any float32
matmul (about 1e-3 relative per product); CUDA runs this path for DTensor parameters (FSDP2)
and ``impl="foreach"``, and the default fused kernels use no matmul.

Reduction: the update of ``b`` is exactly ``b <- a b + u``; with ``inner_lr=0`` and the default
``w2 = 0`` the MLP stays silent and DeepMomentum is exactly SGD momentum (``torch.optim.SGD``,
dampening 0), which a test checks bit for bit.

The memory's initial MLP weights are the group key ``"memory_init"`` (so a meta-learned
initialization travels in the optimizer's ``state_dict``), and ``momentum``/``inner_lr`` may be
tensors: :mod:`deepopt.meta` differentiates through the memory with respect to all three.

Example:
    >>> import torch
    >>> from deepopt.levels.deep import DeepMemory
    >>> lvl = DeepMemory(hidden=4); group = dict(lvl.defaults); p = torch.zeros(6)
    >>> s = lvl.write(lvl.init(p, group), torch.randn(6), p, group, t=1)
    >>> sorted(s)
    ['b1', 'bias', 'w1', 'w2']
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor
from torch.func import grad

from ..base import Direction, Level, State, axpy, check_nonnegative, zeros_like
from ..orthogonal.level import NS_COEFFICIENTS, adjust_lr_ratio, newton_schulz
from ..precision import ns_compute_dtype

__all__ = ["DeepMemory", "default_memory_init", "inner_sums", "mlp_out", "rms_readout", "SIGMAS", "RMS_EPS",
           "straight_through_sign"]

SIGMAS = ("identity", "sign", "rms", "ns")
#: ``sigma="rms"``: ``m / (rms(m) + RMS_EPS)``
RMS_EPS = 1e-30

_STRAIGHT_THROUGH = [False]


class _SignStraightThrough(torch.autograd.Function):
    """sign(x) forward, the identity backward (the straight-through estimator)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.sign()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> Tensor:
        return grad_out


class straight_through_sign:
    """Within the block, the ``"sign"`` read-out passes gradients straight through (Bengio et al.,
    2013): the step is still ``-lr sign(m)``, but a gradient of the step reaches ``m`` as if the
    read-out were the identity, where the true gradient of ``sign`` is zero. Meta-training uses it
    so that a sign read-out's memory learns; outside the block nothing changes.

    Example:
        >>> x = torch.tensor([0.3, -2.0], requires_grad=True)
        >>> lvl = DeepMemory(hidden=2); group = dict(lvl.defaults, sigma="sign")
        >>> with straight_through_sign():
        ...     d = lvl._sigma(x, x, group).num
        >>> d.tolist(), torch.autograd.grad(d.sum(), x)[0].tolist()
        ([1.0, -1.0], [1.0, 1.0])
    """

    def __enter__(self):
        self._before = _STRAIGHT_THROUGH[0]
        _STRAIGHT_THROUGH[0] = True
        return self

    def __exit__(self, *exc) -> None:
        _STRAIGHT_THROUGH[0] = self._before
_MLP_KEYS = ("w1", "b1", "w2")
#: elements per chunk of the foreach path (chunk x hidden floats stay in cache); tensors of at
#: least this many elements are walked one by one, smaller ones of equal size stacked (one chunk
#: loop for all of them). One CPU thread (Xeon, AVX512), 8 x 256 x 1024: 35.3 ms a step against 38.1
#: at 8K elements and 40.0 at 32K (a chunk too big for the cache); 44.6 ms with every equal-sized
#: tensor stacked
CHUNK = 1 << 14


def default_memory_init(hidden: int = 8) -> dict[str, Tensor]:
    """Deterministic initial MLP weights: spread slopes and offsets, silent output (``w2 = 0``)."""
    return {"w1": torch.linspace(0.5, 2.0, hidden), "b1": torch.linspace(-1.0, 1.0, hidden),
            "w2": torch.zeros(hidden)}


def rms_readout(m: Tensor) -> Tensor:
    """``m / (sqrt(mean(m^2)) + RMS_EPS)`` over the whole tensor, the mean in float32 at least
    (``sigma="rms"``; the result in ``m``'s dtype).

    Example:
        >>> rms_readout(torch.tensor([3.0, -4.0])).tolist()  # rms 5 / sqrt(2)
        [0.8485281467437744, -1.1313709020614624]
    """
    dt = _compute_dtype(m)
    rms = m.to(dt).square().mean().sqrt()
    return (m.to(dt) / (rms + RMS_EPS)).to(m.dtype)


def _normalize(u: Tensor) -> Tensor:
    return u / (u.square().mean().sqrt() + 1e-30)


def _mlp(phi: Mapping[str, Tensor], k: Tensor) -> Tensor:
    hidden = torch.tanh(k.unsqueeze(-1) * phi["w1"] + phi["b1"])
    return hidden @ phi["w2"]


def _inner_loss(phi: Mapping[str, Tensor], u: Tensor, k: Tensor) -> Tensor:
    """Momentum's dot-product objective over the memory's read-out (per-element mean for the MLP)."""
    return -(phi["bias"] * u).sum() - (u * _mlp(phi, k)).mean()


_inner_grad = grad(_inner_loss)


class DeepMemory(Level):
    """Deep momentum memory; see the module docstring for the math.

    Args:
        momentum: decay ``a`` of all memory parameters (group key ``"momentum"``).
        inner_lr: the MLP's inner learning rate (group key ``"inner_lr"``; 0 = classic momentum).
        sigma: read-out map, one of ``SIGMAS`` (group key ``"sigma"``).
        hidden: width of the element-wise MLP (structural).
        memory_init: initial ``{"w1", "b1", "w2"}`` tensors of shape ``(hidden,)`` (group key
            ``"memory_init"``, learnable by :mod:`deepopt.meta`); default :func:`default_memory_init`.
        normalize: the MLP reads ``k = u / rms(u)`` (default) or, False, ``k = u`` (structural).
    """

    name = "deep"

    def __init__(self, momentum: float = 0.9, inner_lr: float = 0.1, sigma: str = "identity", hidden: int = 8,
                 memory_init: Mapping[str, Tensor] | None = None, keys: Mapping[str, str] | None = None,
                 normalize: bool = True) -> None:
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"invalid hidden: {hidden!r}; the memory MLP needs an int width >= 1")
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be True or False, got {normalize!r}")
        self.hidden = hidden
        self.normalize = normalize
        init = dict(memory_init) if memory_init is not None else default_memory_init(hidden)
        self._check_init(init)
        self.memory_init = {k: init[k].detach().clone() for k in _MLP_KEYS}
        super().__init__(keys=keys, momentum=momentum, inner_lr=inner_lr, sigma=sigma, memory_init=self.memory_init)

    def _check_init(self, init: Any) -> None:
        if not isinstance(init, Mapping) or any(
                k not in init or not isinstance(init[k], Tensor) or tuple(init[k].shape) != (self.hidden,)
                for k in _MLP_KEYS):
            raise ValueError(f"invalid memory_init: needs a dict of tensors {_MLP_KEYS} of shape ({self.hidden},) "
                             f"(hidden={self.hidden})")

    def validate(self, group: Mapping[str, Any]) -> None:
        check_nonnegative(group, self.key("momentum"))
        check_nonnegative(group, self.key("inner_lr"))
        if self.hp(group, "sigma") not in SIGMAS:
            raise ValueError(f"invalid sigma: {self.hp(group, 'sigma')!r}; use one of {SIGMAS}")
        self._check_init(self.hp(group, "memory_init"))

    def init(self, p: Tensor, group: Mapping[str, Any]) -> State:
        init = self.hp(group, "memory_init")
        # a copy per parameter: the in-place fast path writes into these buffers
        state = {k: init[k].to(device=p.device, dtype=p.dtype, copy=True) for k in _MLP_KEYS}
        state["bias"] = zeros_like(p)
        return state

    def write(self, state: State, x: Tensor, p: Tensor, group: Mapping[str, Any], t: int) -> State:
        a, eta = self.hp(group, "momentum"), self.hp(group, "inner_lr")
        grads = _inner_grad(state, x, self._k(x))
        new = {"bias": torch.add(state["bias"] * a, grads["bias"], alpha=-1.0)}
        for k in _MLP_KEYS:
            keep = state[k] * a if k == "w2" else state[k]  # decay the memory's content, not its features
            new[k] = axpy(keep, grads[k], -eta) if isinstance(eta, Tensor) or eta != 0 else keep
        return new

    def _fast(self, group: Mapping[str, Any], xs: list[Tensor]) -> bool:
        """Whether the analytic foreach path applies: plain float hyperparameters, no autograd."""
        a, eta = self.hp(group, "momentum"), self.hp(group, "inner_lr")
        return not (isinstance(a, Tensor) or isinstance(eta, Tensor) or torch.is_grad_enabled())

    def write_(self, states: list[State], xs: list[Tensor], ps: list[Tensor],
               group: Mapping[str, Any], ts: list[int]) -> None:
        """The write of every tensor in place: ``bias`` by foreach, the MLP by :func:`inner_sums`
        over each group of equal-sized tensors at once."""
        if not self._fast(group, xs):
            return super().write_(states, xs, ps, group, ts)
        a, eta = float(self.hp(group, "momentum")), float(self.hp(group, "inner_lr"))
        biases = [s["bias"] for s in states]
        w2s = [s["w2"] for s in states]
        if eta != 0:  # the sums read the old w1, b1 (and the MLP's step the old w2)
            for idx in _batches(xs):
                u = [xs[i] for i in idx]
                dt = _compute_dtype(u[0])
                w1, b1, w2 = (torch.stack([states[i][k] for i in idx]).to(dt) for k in _MLP_KEYS)
                s0, s1, s2 = inner_sums(u, w1, b1, CHUNK, self.normalize)
                n = u[0].numel()
                w1.addcmul_(w2, s2, value=eta / n)
                b1.addcmul_(w2, s1, value=eta / n)
                w2.mul_(a).add_(s0, alpha=eta / n)
                for k, new in zip(_MLP_KEYS, (w1, b1, w2)):
                    torch._foreach_copy_([states[i][k] for i in idx], list(new.unbind(0)))
        else:
            torch._foreach_mul_(w2s, a)
        torch._foreach_mul_(biases, a)
        torch._foreach_add_(biases, xs)

    def read_(self, states: list[State], xs: list[Tensor], ps: list[Tensor],
              group: Mapping[str, Any], ts: list[int]) -> list[Direction]:
        """The read-out of every tensor: ``bias + MLP(k)`` by :func:`mlp_out` (equal sizes at
        once), then ``sigma``."""
        if not self._fast(group, xs):
            return super().read_(states, xs, ps, group, ts)
        outs: list[Tensor] = [xs[0]] * len(xs)
        for idx in _batches(xs):
            u = [xs[i] for i in idx]
            dt = _compute_dtype(u[0])
            w1, b1, w2 = (torch.stack([states[i][k] for i in idx]).to(dt) for k in _MLP_KEYS)
            out = mlp_out(u, [states[i]["bias"] for i in idx], w1, b1, w2, CHUNK, self.normalize)
            for j, i in enumerate(idx):
                outs[i] = out[j].view(xs[i].shape).to(states[i]["bias"].dtype)
        return [self._sigma(o, p, group) for o, p in zip(outs, ps)]

    def _sigma(self, out: Tensor, p: Tensor, group: Mapping[str, Any]) -> Direction:
        sigma = self.hp(group, "sigma")
        if sigma == "sign":
            if _STRAIGHT_THROUGH[0] and out.requires_grad:
                return Direction(_SignStraightThrough.apply(out))
            return Direction(out.sign())
        if sigma == "rms":
            return Direction(rms_readout(out))
        if sigma == "ns" and p.ndim >= 2:
            dt = ns_compute_dtype(torch.bfloat16, "auto", out.device)  # bf16, or float32 where bf16 is emulated
            o = newton_schulz(out.reshape(out.shape[0], -1), NS_COEFFICIENTS, 5, 1e-7, dt).reshape(out.shape)
            return Direction(o, mul=adjust_lr_ratio(p.shape, None))
        return Direction(out)

    def read(self, state: State, x: Tensor, p: Tensor, group: Mapping[str, Any], t: int) -> Direction:
        # the MLP is always read (a silent one adds exact zeros), so no branch depends on the state
        out = state["bias"] + _mlp(state, self._k(x))
        return self._sigma(out, p, group)

    def _k(self, x: Tensor) -> Tensor:
        """The MLP's input: ``x / rms(x)``, or ``x`` itself with ``normalize=False``."""
        return _normalize(x) if self.normalize else x

    def stats(self, state: State) -> dict[str, float]:
        return {"bias": float(state["bias"].float().norm()), "mlp_w2": float(state["w2"].float().norm())}


def _compute_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _batches(xs: list[Tensor]) -> list[list[int]]:
    """Index groups walked together: each tensor of at least ``CHUNK`` elements alone, smaller ones
    by equal size, dtype and device (stacked into one chunk loop)."""
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(xs):
        key = (i,) if x.numel() >= CHUNK else (x.numel(), x.dtype, x.device)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _flat(ts, dtype: torch.dtype) -> list[Tensor]:
    """Rows: a list of tensors, a ``(B, n)`` tensor or one tensor, each flattened, in ``dtype``."""
    if isinstance(ts, Tensor):
        ts = list(ts.unbind(0)) if ts.ndim == 2 else [ts]
    return [t.detach().reshape(-1).to(dtype) for t in ts]


def _chunks(rows: list[Tensor], chunk: int, normalize: bool = True):
    """``(start, uc, k1)`` per chunk of the equal-sized flat ``rows`` (``chunk`` elements over all
    rows; a single row is read in place, several are gathered into a small block, so nothing of the
    rows' size is allocated): ``uc`` is the ``B x 1 x len`` block of the rows, ``k1`` the
    ``B x 2 x len`` buffer ``[k; 1]`` with ``k = u / rms(u)`` per row (``k = u`` with
    ``normalize=False``; so ``[w1, b1] @ k1 = w1 k + b1`` is one batched matmul). Every view is made
    once per chunk width, not once per chunk."""
    b, n = len(rows), rows[0].numel()
    if normalize:
        norms = torch.stack(torch._foreach_norm(rows, 2)).view(b, 1, 1)
        inv = 1.0 / (norms / n ** 0.5 + 1e-30)
    else:
        inv = torch.ones(b, 1, 1, dtype=rows[0].dtype, device=rows[0].device)
    width = min(max(1, chunk // b), n)
    parts = rows[0].view(1, 1, n).split(width, 2) if b == 1 else [r.split(width) for r in rows]
    k1 = torch.ones(b, 2, width, dtype=rows[0].dtype, device=rows[0].device)
    views: dict[int, tuple[Tensor, Tensor]] = {}
    for j, start in enumerate(range(0, n, width)):
        uc = parts[j] if b == 1 else torch.stack([p[j] for p in parts]).unsqueeze(1)
        if uc.shape[2] not in views:
            kc = k1[..., :uc.shape[2]]
            views[uc.shape[2]] = kc, kc[:, :1]
        kc, k = views[uc.shape[2]]
        torch.mul(uc, inv, out=k)
        yield start, uc, kc


def _rows(x, *ws: Tensor) -> tuple:
    """``(rows, *weights)``: one tensor of any shape with weights ``(hidden,)`` as one row, or
    ``B`` rows (a list, or a ``(B, n)`` tensor) with weights ``(B, hidden)``."""
    if all(w.ndim == 1 for w in ws):
        dt = _compute_dtype(x)
        return (_flat([x], dt),) + tuple(w.to(dt).reshape(1, -1) for w in ws)
    dt = ws[0].dtype
    return (_flat(x, dt),) + ws


def inner_sums(x: Tensor, w1: Tensor, b1: Tensor, chunk: int = CHUNK,
               normalize: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``(S_0, S_1, S_2)`` of the module docstring, one pass in chunks: ``s = sigmoid(2 (w1 k +
    b1))`` (hidden x chunk), then one matmul ``[u k; u] . [s, s - s^2, 1]`` per chunk, from which
    ``h = 2 s - 1`` and ``1 - h^2 = 4 (s - s^2)`` give the sums. ``x``: one
    tensor (any shape, weights of shape ``(hidden,)``) or ``B`` equal-sized rows (a list of
    tensors or a ``(B, n)`` tensor) with weights ``(B, hidden)`` (then each sum is ``(B, hidden)``).
    ``normalize=False``: ``k = x``.

    Example:
        >>> import torch
        >>> x, w1, b1 = (torch.randn(n, dtype=torch.float64) for n in (10, 3, 3))
        >>> k = x / x.square().mean().sqrt(); h = torch.tanh(k[:, None] * w1 + b1)
        >>> s0, s1, s2 = inner_sums(x, w1, b1, chunk=4)
        >>> torch.allclose(s0, x @ h) and torch.allclose(s2, (x * k) @ (1 - h * h))
        True
    """
    single = w1.ndim == 1
    rows, w1, b1 = _rows(x, w1, b1)
    wb, h, b = 2 * torch.stack((w1, b1), -1), w1.shape[1], len(rows)  # B x hidden x 2, doubled: sigmoid(2z)
    acc = torch.zeros(b, 2, 2 * h + 1, dtype=w1.dtype, device=w1.device)  # [u k; u] . [s, s - s^2, 1]
    bufs: dict[int, tuple[Tensor, ...]] = {}
    for _, uc, k1 in _chunks(rows, chunk, normalize):
        if uc.shape[2] not in bufs:  # contiguous buffers, reused by every chunk of this width
            sd = torch.empty(b, 2 * h + 1, uc.shape[2], dtype=w1.dtype, device=w1.device)
            sd[:, 2 * h].fill_(1.0)  # the constant row: sum_e u_e
            bufs[uc.shape[2]] = sd, sd[:, :h], sd[:, h:2 * h], sd.mT, torch.empty_like(k1)
        sd, sg, d, sd_t, ku = bufs[uc.shape[2]]
        torch.bmm(wb, k1, out=sg).sigmoid_()  # sigmoid(2 (w1 k + b1)), hidden x chunk
        torch.addcmul(sg, sg, sg, value=-1.0, out=d)  # s - s^2 = (1 - h^2) / 4
        torch.mul(k1, uc, out=ku)  # [k; 1] -> [u k; u]
        acc.baddbmm_(ku, sd_t)
    # h = tanh(z) = 2 s - 1: S_0 = 2 sum u s - sum u; 1 - h^2 = 4 (s - s^2)
    s0 = 2 * acc[:, 1, :h] - acc[:, 1, 2 * h:]
    s1, s2 = 4 * acc[:, 1, h:2 * h], 4 * acc[:, 0, h:2 * h]
    return (s0[0], s1[0], s2[0]) if single else (s0, s1, s2)


def mlp_out(x: Tensor, bias: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, chunk: int = CHUNK,
            normalize: bool = True) -> Tensor:
    """``bias + sum_j w2_j tanh(w1_j k + b1_j)`` (``k = x / rms(x)``), one pass in chunks (two
    matmuls and a sigmoid each, ``tanh(z) = 2 sigmoid(2 z) - 1``): one tensor (in ``bias``'s
    shape and dtype) or ``B`` rows as in :func:`inner_sums` (``bias`` rows alike; the result
    ``(B, n)``; ``normalize=False``: ``k = x``).

    Example:
        >>> import torch
        >>> x, b = torch.randn(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
        >>> w = torch.randn(3, dtype=torch.float64)
        >>> k = x / x.square().mean().sqrt()
        >>> torch.allclose(mlp_out(x, b, w, w, w, chunk=2), torch.tanh(k[:, None] * w + w) @ w)
        True
    """
    single = w1.ndim == 1
    rows, w1, b1, w2 = _rows(x, w1, b1, w2)
    biases = _flat([bias] if single else bias, w1.dtype)
    # tanh(z) = 2 sigmoid(2 z) - 1, so w2 . h = [2 w2, -sum w2] . [sigmoid(2 z); 1]
    wb = 2 * torch.stack((w1, b1), -1)  # B x hidden x 2
    w2 = torch.cat((2 * w2, -w2.sum(1, keepdim=True)), 1).unsqueeze(1)  # B x 1 x (hidden + 1)
    b, n, h = len(rows), rows[0].numel(), w1.shape[1]
    rows_b = biases[0].view(1, 1, n) if b == 1 else torch.stack(biases).unsqueeze(1)  # B x 1 x n
    out = torch.empty(b, 1, n, dtype=w1.dtype, device=w1.device)
    bufs: dict[int, tuple[Tensor, Tensor]] = {}
    for start, uc, k1 in _chunks(rows, chunk, normalize):
        width = uc.shape[2]
        if width not in bufs:  # a contiguous buffer, reused by every chunk of this width
            z = torch.empty(b, h + 1, width, dtype=w1.dtype, device=w1.device)
            z[:, h].fill_(1.0)
            bufs[width] = z, z[:, :h]
        z, sg = bufs[width]
        torch.bmm(wb, k1, out=sg).sigmoid_()
        torch.baddbmm(rows_b[..., start:start + width], w2, z, out=out[..., start:start + width])  # bias + w2 . h
    out = out.squeeze(1)
    return out[0].to(bias.dtype).reshape(bias.shape) if single else out
