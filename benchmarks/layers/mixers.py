"""The mixers the ``layers`` suite times, ours and the optional peers, as :class:`Case` objects.

A case's ``make(batch, length)`` builds the layer in the suite's dtype on the device, two
rotating random inputs (never zeros) and output gradients, and returns one step: forward, then
backward into the weights and the input. Ours are built with keyword arguments that exist in the
installed ``nl_layers`` (a keyword the constructor lacks is dropped, see :func:`construct`), so
new optional arguments (``impl``, ``anchor_size``) keep their defaults; the chunk size and such
that the built layer reports are recorded in the case's ``config``.

Ours: SDPA causal attention (``AttentionMemory(impl="sdpa")``), ``LinearMemory`` for the hebbian,
delta and dgd rules (default ``impl``; also ``impl="torch"`` when the argument exists),
``NeuralMemory`` (Titans), ``SelfModifyingTitans``, ``HopeBlock``. Peers, when importable
(otherwise recorded in ``unavailable`` with the reason): fla's op ``chunk_delta_rule`` (op only:
no projections), fla's ``GatedDeltaNet`` layer (or, when ``fla.layers`` is absent as in fla-core,
fla's ``chunk_gated_delta_rule`` inside LinearMemory-shaped projections), titans-pytorch's
``NeuralMemory(dim, chunk_size, heads, dim_head=dim // heads)`` (our head layout; its default,
``heads`` heads of width ``dim``, is what the Titans comparison times, as the issue's reference did).

Example:
    >>> cases, unavailable = mixer_cases(dim=16, heads=2, device="cpu", dtype=torch.float32)
    >>> [c.name for c in cases][:2]
    ['SDPA attention', 'linear hebbian']
    >>> step = cases[0].make(2, 8)
    >>> step()
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

RULES = ("hebbian", "delta", "dgd")


@dataclass
class Case:
    """One timed thing: ``make(batch, length) -> step``; ``source`` is "ours" or the peer's package."""

    name: str
    source: str
    make: Callable[[int, int], Callable[[], None]]
    config: dict = field(default_factory=dict)


def accepts(cls, name: str) -> bool:
    """Whether ``cls``'s constructor takes the keyword ``name``."""
    params = inspect.signature(cls).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def construct(cls, *args, **kwargs):
    """``cls(*args, **kwargs)`` without the keywords its constructor does not take."""
    return cls(*args, **{k: v for k, v in kwargs.items() if accepts(cls, k)})


def module_config(module: nn.Module) -> dict:
    """chunk_size / anchor_size / impl / grad_impl of the first submodule that has them."""
    out = {}
    for sub in module.modules():
        for key in ("chunk_size", "anchor_size", "impl", "grad_impl"):
            if key not in out and hasattr(sub, key) and isinstance(getattr(sub, key), (int, str, type(None))):
                out[key] = getattr(sub, key)
    if out.get("impl") == "sdpa":
        out.pop("chunk_size", None)  # the chunk size of AttentionMemory's memory form, unused by SDPA
    return out


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def module_case(name: str, source: str, build: Callable[[], nn.Module], dim: int, device: str,
                dtype: torch.dtype) -> Case:
    """A case for a (B, T, dim) -> (B, T, dim) module (its output may be a tuple: the first item)."""
    case = Case(name, source, lambda b, t: None)

    def make(batch: int, length: int):
        layer = build().to(device=device, dtype=dtype)
        case.config.update(module_config(layer))
        xs = [torch.randn(batch, length, dim, device=device, dtype=dtype).requires_grad_() for _ in range(2)]
        grads = [torch.randn(batch, length, dim, device=device, dtype=dtype) for _ in range(2)]
        turn = [0]

        def step():
            i = turn[0] = (turn[0] + 1) % 2
            x = xs[i]
            x.grad = None
            layer.zero_grad(set_to_none=True)
            _first(layer(x)).backward(grads[i])

        return step

    case.make = make
    return case


def ours(dim: int, heads: int, device: str, dtype: torch.dtype) -> list[Case]:
    """Our mixers (see the module doc)."""
    import nl_layers

    def case(name, build):
        return module_case(name, "ours", build, dim, device, dtype)

    cases = [case("SDPA attention", lambda: construct(nl_layers.AttentionMemory, dim, heads=heads, impl="sdpa"))]
    torch_impl = accepts(nl_layers.LinearMemory, "impl")
    for rule in RULES:
        cases.append(case(f"linear {rule}", lambda r=rule: construct(nl_layers.LinearMemory, dim, heads=heads, rule=r)))
        if torch_impl:
            cases.append(case(f"linear {rule} (torch)",
                              lambda r=rule: nl_layers.LinearMemory(dim, heads=heads, rule=r, impl="torch")))
    if accepts(nl_layers.LinearMemory, "impl"):
        cases += [op_case(dim, heads, device, dtype, "delta", decay) for decay in (False, True)]
    cases.append(case("Titans NeuralMemory", lambda: construct(nl_layers.NeuralMemory, dim, heads=heads)))
    cases.append(case("SelfModifyingTitans", lambda: construct(nl_layers.SelfModifyingTitans, dim, heads=heads)))
    cases.append(case("HopeBlock", lambda: construct(nl_layers.HopeBlock, dim, heads=heads)))
    return cases


def op_inputs(batch: int, length: int, heads: int, head_dim: int, device: str, dtype: torch.dtype, decay: bool):
    """Two rotating input sets for a bare linear-memory op: (q, k, v, step, log_decay or None, dy),
    (B, T, H, K) leaves with k l2-normalized, steps in (0, 1), log-decays near log 0.95."""

    def leaf(t):
        return t.to(dtype).requires_grad_()

    shape, gates = (batch, length, heads, head_dim), (batch, length, heads)
    return [(leaf(torch.randn(shape, device=device)), leaf(F.normalize(torch.randn(shape, device=device), dim=-1)),
             leaf(torch.randn(shape, device=device)), leaf(torch.randn(gates, device=device).sigmoid()),
             leaf(F.logsigmoid(torch.randn(gates, device=device) + 3)) if decay else None,
             torch.randn(shape, device=device, dtype=dtype)) for _ in range(2)]


def bare_op_case(name: str, source: str, dim: int, heads: int, device: str, dtype: torch.dtype, decay: bool,
                 call, config: dict) -> Case:
    """A case timing ``call(q, k, v, step, log_decay) -> (y, state)`` forward + backward alone."""

    def make(batch: int, length: int):
        sets, turn = op_inputs(batch, length, heads, dim // heads, device, dtype, decay), [0]

        def step():
            i = turn[0] = (turn[0] + 1) % 2
            *inputs, do = sets[i]
            for t in inputs:
                if t is not None:
                    t.grad = None
            y, _ = call(*inputs)
            y.backward(do)

        return step

    return Case(name, source, make, config)


def op_case(dim: int, heads: int, device: str, dtype: torch.dtype, rule: str, decay: bool) -> Case:
    """Our ``linear_memory_chunked`` alone (impl "auto"), on the same inputs as :func:`fla_op_case`
    (plus a log-decay when ``decay``). Without decay and with rule "delta" it computes what fla's
    ``chunk_delta_rule`` does."""
    from nl_layers import linear_memory_chunked

    def call(q, k, v, lr, log_decay):
        return linear_memory_chunked(q, k, v, rule=rule, lr=lr, log_decay=log_decay, layout="bthd")

    return bare_op_case(f"linear {rule}{' gated' if decay else ''} (op only)", "ours", dim, heads, device, dtype,
                        decay, call, {"impl": "auto"})


def _import(name: str):
    """The module, or the reason it cannot be imported."""
    try:
        return importlib.import_module(name), None
    except Exception as err:  # ImportError, or a peer that fails while importing (wrong triton, ...)
        return None, f"{name} not importable: {type(err).__name__}: {err}"[:200]


def fla_op_case(dim: int, heads: int, device: str, dtype: torch.dtype, chunk_delta_rule) -> Case:
    """fla's ``chunk_delta_rule`` alone: q, k, v (B, T, H, K), k l2-normalized, beta in (0, 1)."""
    return bare_op_case("fla chunk_delta_rule (op only)", "fla", dim, heads, device, dtype, False,
                        lambda q, k, v, beta, _: chunk_delta_rule(q, k, v, beta), {"chunk_size": 64})


class FlaGatedDelta(nn.Module):
    """LinearMemory(rule="delta")'s projections around fla's ``chunk_gated_delta_rule``: q, k, v
    (q, k l2-normalized in the kernel), step size sigmoid(w_b x), log-decay logsigmoid(w_a x)."""

    def __init__(self, dim: int, heads: int, chunk_gated_delta_rule):
        super().__init__()
        self.heads, self.head_dim, self.op = heads, dim // heads, chunk_gated_delta_rule
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_lr = nn.Linear(dim, heads)
        self.to_decay = nn.Linear(dim, heads)
        nn.init.constant_(self.to_decay.bias, 3.0)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (y.reshape(b, t, self.heads, self.head_dim) for y in self.to_qkv(x).chunk(3, dim=-1))
        beta = torch.sigmoid(self.to_lr(x))
        g = F.logsigmoid(self.to_decay(x).float())
        o, _ = self.op(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
        return self.out(o.reshape(b, t, -1))


def peers(dim: int, heads: int, device: str, dtype: torch.dtype, titans_chunk: int) -> tuple[list[Case], dict]:
    """The peers that import here, and {peer: reason} for those that do not."""
    cases, unavailable = [], {}
    delta, why = _import("fla.ops.delta_rule")
    if delta is not None:
        cases.append(fla_op_case(dim, heads, device, dtype, delta.chunk_delta_rule))
    else:
        unavailable["fla chunk_delta_rule"] = why
    layers, why_layers = _import("fla.layers")
    if layers is not None and hasattr(layers, "GatedDeltaNet"):
        build = lambda: construct(layers.GatedDeltaNet, hidden_size=dim, num_heads=heads, head_dim=dim // heads,  # noqa: E731
                                  expand_v=1, mode="chunk")
        cases.append(module_case("fla GatedDeltaNet layer", "fla", build, dim, device, dtype))
    else:
        gated, why = _import("fla.ops.gated_delta_rule")
        if gated is not None:
            build = lambda: FlaGatedDelta(dim, heads, gated.chunk_gated_delta_rule)  # noqa: E731
            cases.append(module_case("fla chunk_gated_delta_rule in our projections", "fla", build, dim, device, dtype))
            unavailable["fla GatedDeltaNet layer"] = (why_layers or "fla.layers has no GatedDeltaNet") + \
                "; timed fla's chunk_gated_delta_rule inside LinearMemory's projections instead"
        else:
            unavailable["fla GatedDeltaNet layer"] = why_layers
    cases += titans_pytorch_cases(dim, heads, device, dtype, (titans_chunk,), unavailable, dim_head=dim // heads)
    return cases, unavailable


def titans_pytorch_cases(dim: int, heads: int, device: str, dtype: torch.dtype, chunks, unavailable: dict,
                         dim_head: int | None = None) -> list[Case]:
    """titans-pytorch's ``NeuralMemory(dim, chunk_size=c, heads=heads)`` per chunk size; its
    per-head width defaults to ``dim`` (``heads`` heads of ``dim`` each) unless ``dim_head`` is given."""
    mod, why = _import("titans_pytorch")
    if mod is None:
        unavailable["titans-pytorch NeuralMemory"] = why
        return []
    width = {} if dim_head is None else {"dim_head": dim_head}
    name = "titans-pytorch NeuralMemory" + ("" if dim_head is None else f" (dim_head {dim_head})")
    cases = [module_case(name, "titans-pytorch", lambda c=c: mod.NeuralMemory(dim, chunk_size=c, heads=heads, **width),
                         dim, device, dtype) for c in chunks]
    for case, c in zip(cases, chunks):
        case.config.update(chunk_size=c, heads=heads, dim_head=dim_head or dim)
    return cases


def mixer_cases(dim: int, heads: int, device: str, dtype: torch.dtype, titans_chunk: int | None = None,
                with_peers: bool = True) -> tuple[list[Case], dict]:
    """Ours, then the importable peers; and {peer: reason} for the others. titans-pytorch runs at
    ``titans_chunk`` (default: the chunk size of our NeuralMemory at its defaults)."""
    cases = ours(dim, heads, device, dtype)
    if not with_peers:
        return cases, {}
    if titans_chunk is None:
        import nl_layers

        titans_chunk = getattr(construct(nl_layers.NeuralMemory, dim, heads=heads), "chunk_size", 16)
    more, unavailable = peers(dim, heads, device, dtype, titans_chunk)
    return ordered(cases + more), unavailable


def ordered(cases: list[Case]) -> list[Case]:
    """The likely fast mixers first (attention, linear, fla), then the Titans family with the
    titans-pytorch peer before SelfModifyingTitans and HOPE, so a part's budget reaches every peer."""
    rank = {"Titans NeuralMemory": 1, "titans-pytorch": 2, "SelfModifyingTitans": 3, "HopeBlock": 4}

    def key(item):
        i, case = item
        return next((r for prefix, r in rank.items() if case.name.startswith(prefix)), 0), i

    return [c for _, c in sorted(enumerate(cases), key=key)]


def titans_cases(dim: int, heads: int, chunk: int, device: str, dtype: torch.dtype, unavailable: dict) -> list[Case]:
    """The Titans comparison at one chunk size: our NeuralMemory and SelfModifyingTitans, titans-pytorch's."""
    import nl_layers

    mine = [module_case("Titans NeuralMemory", "ours", lambda: construct(nl_layers.NeuralMemory, dim, heads=heads,
                                                                        chunk_size=chunk), dim, device, dtype),
            module_case("SelfModifyingTitans", "ours", lambda: construct(nl_layers.SelfModifyingTitans, dim, heads=heads,
                                                                        chunk_size=chunk), dim, device, dtype)]
    return mine + titans_pytorch_cases(dim, heads, device, dtype, (chunk,), unavailable)
