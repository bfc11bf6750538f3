"""The write rules of the linear memory and their step sizes.

Every rule writes M_t = a_t M_{t-1} + u_t k_t^T with a decay a_t = exp(log_decay_t) in (0, 1]:

    hebbian:  u_t = b_t v_t                                  (gated linear attention)
    delta:    u_t = b_t (v_t - a_t M_{t-1} k_t)              (Gated DeltaNet)
    dgd:      the delta rule with b_t -> c_t = b_t / (1 + b_t ||k_t||^2)   (Longhorn)

so past the step size, dgd and delta are one recurrence.

Example:
    >>> k = torch.ones(1, 1, 2, 4) / 2          # ||k|| = 1
    >>> step_sizes("dgd", k, 1.0, torch.float64)
    tensor([[[0.5000, 0.5000]]], dtype=torch.float64)
"""

from __future__ import annotations

import torch

__all__ = ["RULES", "is_delta", "step_sizes"]

RULES = ("hebbian", "delta", "dgd")


def is_delta(rule: str) -> bool:
    """Whether the rule corrects the decayed memory's read-out (delta and dgd) or only adds (hebbian)."""
    return rule != "hebbian"


def step_sizes(rule: str, k: torch.Tensor, lr, dtype: torch.dtype) -> torch.Tensor:
    """The per-token step b_t of ``rule`` in ``dtype``, shape ``k.shape[:-1]``.

    ``lr`` is a float or a tensor of that shape; dgd rescales it to b_t / (1 + b_t ||k_t||^2).
    """
    if isinstance(lr, torch.Tensor):
        b = lr.to(dtype)
    else:
        b = torch.full(k.shape[:-1], float(lr), dtype=dtype, device=k.device)
    if rule == "dgd":
        kf = k.to(dtype)
        b = b / (1.0 + b * (kf * kf).sum(-1))
    return b
