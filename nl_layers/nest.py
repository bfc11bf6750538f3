"""nest(): put a Continuum Memory System into an existing model, without changing what it computes.

Every feed-forward block found is replaced by a :class:`~nl_layers.CMS` built from it
(:meth:`CMS.from_ffn`: the pre-trained FFN becomes level 1, the new levels start as exact no-ops),
so right after nesting the model's outputs are those of the original, and the returned level
specification ``{parameter name: period}`` tells deepopt optimizers
(``deepopt.group_by_period``) and the Lightning callback how often each level learns.

Where FFNs are found (``ffn=``):

- ``"auto"`` (default): ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` (their
  linear1 -> activation -> dropout -> linear2) and Hugging Face GPT-2-style MLPs (a module with
  Conv1D-like ``c_fc`` and ``c_proj`` children, weights stored (in, out));
- a module class or tuple of classes: every module of those types is an FFN;
- a name or fnmatch pattern (or a list of them) over ``model.named_modules()``, e.g.
  ``"blocks.*.mlp"``: every matching module is an FFN (the outermost one when nested matches).

For a Transformer layer, linear1 is replaced by the CMS and activation, dropout and linear2 by
identities, so ``_ff_block`` computes dropout2(CMS(x)); the layer's and the encoder's fused
inference fast paths (which read linear1.weight directly) are switched off, so eval mode computes
what the original computes without them. Where the original took them (eval, no grad), its outputs
differ by float rounding, and positions masked by ``src_key_padding_mask`` (zeros on the fused
nested-tensor path) now hold the values the layer computes there.
Parameter names then read ``...linear1.blocks.0.fc1.weight`` (level 1 is the old linear1/linear2).
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn

from .cms import CMS, MLPBlock

_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def is_gpt2_mlp(module: nn.Module) -> bool:
    """A module with Conv1D-like ``c_fc`` (weight (d, h)) and ``c_proj`` (weight (h, d)) children."""
    fc, proj = getattr(module, "c_fc", None), getattr(module, "c_proj", None)
    if not isinstance(fc, nn.Module) or not isinstance(proj, nn.Module):
        return False
    wf, wp = getattr(fc, "weight", None), getattr(proj, "weight", None)
    return wf is not None and wp is not None and wf.ndim == 2 and wp.ndim == 2 and wf.shape[::-1] == wp.shape


def _find(model: nn.Module, ffn) -> list[str]:
    modules = dict(model.named_modules())
    if isinstance(ffn, str) and ffn == "auto":
        hits = [n for n, m in modules.items() if isinstance(m, _TRANSFORMER_LAYERS) or is_gpt2_mlp(m)]
        if not hits:
            raise ValueError(
                "nest found no FFN: no nn.TransformerEncoderLayer/DecoderLayer or GPT-2-style MLP in the model; "
                "pass ffn= a module class or a module name pattern such as 'blocks.*.mlp'"
            )
    elif isinstance(ffn, type) or (isinstance(ffn, tuple) and ffn and all(isinstance(t, type) for t in ffn)):
        hits = [n for n, m in modules.items() if isinstance(m, ffn)]
        if not hits:
            raise ValueError(f"nest found no module of type {ffn!r} in the model")
    elif isinstance(ffn, str) or (isinstance(ffn, Sequence) and ffn and all(isinstance(p, str) for p in ffn)):
        patterns = [ffn] if isinstance(ffn, str) else list(ffn)
        hits = []
        for pattern in patterns:
            found = [n for n in modules if n and (n == pattern or fnmatchcase(n, pattern))]
            if not found:
                sample = ", ".join([n for n in modules if n][:8])
                raise ValueError(f"ffn pattern {pattern!r} matches no module; module names look like: {sample}")
            hits += found
    else:
        raise TypeError(f"ffn must be 'auto', a module class (or tuple), or a name pattern (or list), got {ffn!r}")
    if "" in hits:
        raise ValueError("nest cannot replace the model itself; name one of its submodules")
    outermost = []
    for name in sorted(set(hits), key=lambda n: (n.count("."), n)):
        if not any(name.startswith(p + ".") for p in outermost):
            outermost.append(name)
    for name in outermost:
        if isinstance(modules[name], CMS) or any(isinstance(m, CMS) for m in modules[name].modules()):
            raise ValueError(f"module {name!r} already holds a CMS; nest each FFN once")
    return sorted(outermost)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def nest(
    model: nn.Module,
    ffn="auto",
    levels: Sequence[int] = (1, 4),
    variant: str = "sequential",
    hidden: int | None = None,
    activation=None,
    in_context: Sequence[int | None] | None = None,
    in_context_lr: float | Sequence[float] = 1e-2,
) -> dict[str, int]:
    """Replace the FFN blocks of ``model`` (in place) by CMS levels; return the level specification.

    Args:
        model: any nn.Module.
        ffn: where the FFNs are (see the module docstring).
        levels: one update period per CMS level; level 1 is the original FFN (e.g. (16, 1): the
            pre-trained FFN learns every 16 steps, a new fast level every step).
        variant: "sequential", "independent" or "nested" (see :class:`~nl_layers.CMS`).
        hidden, activation: of the new levels of the sequential variant (default: the FFN's).
        in_context, in_context_lr: in-context chunk sizes and step sizes (see :class:`~nl_layers.CMS`).

    Returns:
        ``{parameter name: period}`` for every CMS parameter (other parameters: period 1).

    Example:
        >>> layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        >>> model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
        >>> x = torch.randn(2, 5, 16)
        >>> before = model(x)
        >>> spec = nest(model, levels=(8, 1))
        >>> bool(torch.allclose(model(x), before, atol=1e-6))
        True
        >>> spec["layers.0.linear1.blocks.1.fc1.weight"]
        1
    """
    targets = _find(model, ffn)
    kwargs = dict(periods=levels, variant=variant, in_context=in_context, in_context_lr=in_context_lr)
    spec: dict[str, int] = {}
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, _TRANSFORMER_LAYERS):
            if in_context is not None and not getattr(module.self_attn, "batch_first", False):
                raise ValueError(f"{name}: in-context mode needs batch_first=True (inputs (batch, time, dim))")
            lin1, lin2 = module.linear1, module.linear2
            act = module.activation
            block = MLPBlock(lin1, lin2, act, module.dropout)
            cms = CMS.from_ffn(
                block, dim=lin1.in_features, hidden=hidden or lin1.out_features,
                activation=activation or act, **kwargs,
            )
            module.linear1 = cms
            module.dropout, module.linear2, module.activation = nn.Identity(), nn.Identity(), nn.Identity()
            module.activation_relu_or_gelu = 0  # no fused fast path: it would bypass the CMS
            path = f"{name}.linear1"
        elif is_gpt2_mlp(module):
            d, h = module.c_fc.weight.shape
            act = getattr(module, "act", None) or "gelu"
            cms = CMS.from_ffn(module, dim=d, hidden=hidden or h, activation=activation or act, **kwargs)
            _set(model, name, cms)
            path = name
        else:
            cms = CMS.from_ffn(module, hidden=hidden, activation=activation or "gelu", **kwargs)
            _set(model, name, cms)
            path = name
        spec.update(cms.level_spec(prefix=f"{path}."))
    for m in model.modules():  # the encoder's nested-tensor fast path reads linear1.weight too
        if isinstance(m, nn.TransformerEncoder) and any(isinstance(layer.linear1, CMS) for layer in m.layers):
            m.use_nested_tensor = False
    return spec
