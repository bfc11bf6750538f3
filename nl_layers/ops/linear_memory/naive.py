"""Token-by-token reference of the linear memory (the definition the other forms are tested against).

Per head, with a_t = exp(log_decay_t) and the step b_t of the rule (see ``rules``):

    M_t = a_t M_{t-1} + b_t v_t k_t^T                          hebbian
    M_t = a_t M_{t-1} + b_t (v_t - a_t M_{t-1} k_t) k_t^T      delta, dgd (Gated DeltaNet)
    y_t = M_t q_t

Example:
    >>> q = k = torch.randn(1, 2, 5, 4, dtype=torch.float64); v = torch.randn(1, 2, 5, 3, dtype=torch.float64)
    >>> y, m = recurrent(q, k, v, torch.full((1, 2, 5), 0.5, dtype=torch.float64), None, None, delta=True)
    >>> y.shape, m.shape
    (torch.Size([1, 2, 5, 3]), torch.Size([1, 2, 3, 4]))
"""

from __future__ import annotations

import torch

__all__ = ["recurrent"]


def recurrent(q, k, v, b, log_decay, initial_state, *, delta: bool):
    """The recurrence above in q's dtype.

    Args:
        q, k: (B, H, T, dk); v: (B, H, T, dv).
        b: step sizes (B, H, T); log_decay: None (a_t = 1) or log a_t (B, H, T).
        initial_state: M_0 (B, H, dv, dk), zeros when None.
        delta: delta/dgd recurrence if True, hebbian if False.

    Returns:
        (y, M_T): y (B, H, T, dv) and the final memory (B, H, dv, dk).
    """
    dtype = q.dtype
    bsz, h, t, dk = k.shape
    m = initial_state.to(dtype) if initial_state is not None else k.new_zeros(bsz, h, v.shape[-1], dk)
    b = b.to(dtype)
    a = log_decay.to(dtype).exp() if log_decay is not None else None
    ys = []
    for i in range(t):
        kt, vt = k[:, :, i], v[:, :, i]
        if a is not None:
            m = a[:, :, i, None, None] * m
        write = vt - torch.einsum("bhvk,bhk->bhv", m, kt) if delta else vt
        m = m + b[:, :, i, None, None] * write[..., :, None] * kt[..., None, :]
        ys.append(torch.einsum("bhvk,bhk->bhv", m, q[:, :, i]))
    return torch.stack(ys, dim=2), m
