"""M3: multi-scale momentum Muon (paper Algorithm 1), any number of momentum levels."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from ..chain import Chain
from ..levels.multiscale import MultiScaleMomentum
from ..levels.orthogonal import NS_COEFFICIENTS
from .base import LevelOptimizer, Rule

__all__ = ["M3"]


class M3(LevelOptimizer):
    r"""Multi-scale momentum Muon: fast and slow momentum memories, orthogonalized and mixed.

    With the paper's two levels (``betas=(b1, b2, b3)``, ``alpha``, ``frequency=f``):

    .. math::
        M_1 \leftarrow M_1 + \beta_1 g \ \text{(every step)},\quad
        M_2 \leftarrow M_2 + \beta_3 \textstyle\sum_{\text{chunk}} g \ \text{(every } f \text{ steps)},\quad
        V \leftarrow V + \beta_2 g^2,

    .. math::
        W \leftarrow W - \eta\,\frac{\mathrm{NS}(M_1) + \alpha\,\mathrm{NS}(M_2)}{\sqrt{V} + \epsilon}

    (``form="literal"``; ``NS(M_2)`` recomputed only at the chunk boundary). The literal
    accumulators never forget and ``NS(M)/sqrt(V)`` has the wrong scale, so its steps blow up
    on trained models. ``form="stable"`` (default) uses EMAs with bias correction
    (:math:`M_i \leftarrow \beta_i M_i + (1-\beta_i)\,\mathrm{mean}_\text{chunk}\, g`, likewise
    ``V``) and rescales each matrix step to RMS ``target_rms`` (0.2, AdamW's typical update RMS).
    AdamW's learning rate does not carry over as is: on two small MLPs (``python -m
    benchmarks.lr_transfer``) M3's best rate was 3x AdamW's best, and at AdamW's rate it trained
    slower (digits MLP, 200 steps: held-out loss 0.69 against AdamW's 0.10); start from 3x AdamW's
    rate and tune. Non-matrix parameters (and groups with
    ``orthogonalize=False``) skip the orthogonalization: for them M3 is a multi-scale Adam.

    Nested Learning reading: each momentum is a memory of gradients at its own frequency (a
    Continuum Memory System over the gradient stream); the slow one keeps what the fast one
    overwrites; Newton-Schulz maps each memory to its read-out.
    ``momenta=((beta, period, weight), ...)`` gives any number of levels instead. Special cases
    (tested exactly): one level ``(b1, 1, 1.0)``, ``orthogonalize=False`` is ``torch.optim.AdamW``
    (stable) and ``AdamMemory(form="accumulate")`` (literal).

    Args:
        params: parameters or param groups.
        lr, weight_decay (decoupled): as usual.
        betas: ``(b1, b2, b3)``: fast momentum, second moment, slow momentum. A group key read at
            every step (``momenta[0]``, ``beta2`` and ``momenta[1]`` follow it), so schedulers that
            cycle ``betas[0]`` work.
        alpha: weight of the slow level; frequency: its period ``f``.
        momenta: explicit levels (overrides ``betas[0]``, ``betas[2]``, ``alpha``, ``frequency``).
        eps, form, target_rms, ns_steps, ns_coefficients, ns_dtype: see above.
        ns_method: the Newton-Schulz form (a group key), as in :class:`~deepopt.MuonMemory`:
            ``"auto"`` (default; the Gram form on CUDA for matrices with ``n >= 2m``, torch's
            iteration elsewhere, in float32 on a CPU without native bf16 matmuls), ``"standard"``
            (torch's iteration) or ``"gram"``.
        maximize: ascend (step along ``+g``), as torch optimizers.
        impl, nonfinite: see :class:`~deepopt.optim.base.LevelOptimizer`.

    Example:
        >>> import torch, deepopt
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> opt = deepopt.M3(model.parameters(), lr=1e-3, frequency=10)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float, float] = (0.9, 0.999, 0.99),
                 alpha: float = 0.5, frequency: int = 10, eps: float = 1e-8, weight_decay: float = 0.0,
                 form: str = "stable", target_rms: float | None = 0.2,
                 momenta: Sequence[tuple[float, int, float]] | None = None, ns_steps: int = 5,
                 ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS, *,
                 ns_dtype: torch.dtype | None = torch.bfloat16, ns_method: str = "auto", impl: str = "auto",
                 nonfinite: str = "skip", maximize: bool = False) -> None:
        rule = self._rule(lr, betas, alpha, frequency, eps, weight_decay, form, target_rms, momenta, ns_steps,
                          ns_coefficients, ns_dtype, ns_method)
        super().__init__(params, rule.defaults, rule.chains, impl=impl, nonfinite=nonfinite,
                         maximize=maximize)

    @classmethod
    def _rule(cls, lr: float, betas: tuple[float, float, float], alpha: float, frequency: int, eps: float,
              weight_decay: float, form: str, target_rms: float | None,
              momenta: Sequence[tuple[float, int, float]] | None, ns_steps: int,
              ns_coefficients: tuple[float, float, float], ns_dtype: torch.dtype | None,
              ns_method: str = "auto") -> Rule:
        if len(betas) != 3:
            raise ValueError(f"invalid betas: {betas!r}; M3 takes (beta1, beta2, beta3)")
        if momenta is None:
            momenta = ((betas[0], 1, 1.0), (betas[2], frequency, alpha))
        level = MultiScaleMomentum(momenta, betas[1], eps, form, target_rms, ns_steps, ns_coefficients, ns_dtype)
        defaults = dict(lr=lr, weight_decay=weight_decay, orthogonalize=None, ns_method=ns_method, **level.defaults)
        defaults["betas"] = _betas_of(defaults["momenta"], defaults["beta2"], betas[2])
        return Rule([Chain(level)], defaults, cls.weight_decay_mode)

    def _prepare_group(self, group: dict[str, Any]) -> None:
        """The group's ``betas`` drive the levels: ``momenta[0]``'s beta, ``beta2`` and (with two or
        more levels) ``momenta[1]``'s beta, so ``OneCycleLR(cycle_momentum=True)`` cycles ``betas[0]``."""
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 3):
            raise ValueError(f"invalid betas: {betas!r}; M3 takes (beta1, beta2, beta3)")
        momenta = [tuple(m) for m in group["momenta"]]
        momenta[0] = (betas[0], *momenta[0][1:])
        if len(momenta) > 1:
            momenta[1] = (betas[2], *momenta[1][1:])
        group["momenta"], group["beta2"] = tuple(momenta), betas[1]

    def _upgrade_group(self, group: dict[str, Any]) -> None:
        super()._upgrade_group(group)
        if "betas" not in group:  # checkpoints written before M3's groups held betas
            group["betas"] = _betas_of(group["momenta"], group["beta2"], 0.99)
        group.setdefault("ns_method", "standard")  # checkpoints written before ns_method: the form they ran

    def _optional_keys(self) -> set[str]:
        return super()._optional_keys() | {"betas", "ns_method"}


def _betas_of(momenta: Sequence[tuple[float, int, float]], beta2: float, beta3: float) -> tuple[float, float, float]:
    """M3's ``(b1, b2, b3)`` as the levels hold them (``b3`` as given when there is one level)."""
    return (momenta[0][0], beta2, momenta[1][0] if len(momenta) > 1 else beta3)
