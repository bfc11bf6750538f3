"""The bounded inner step: NLMS normalisation by the token's curvature, and a clipped error.

A fast-weight memory learns from token t by a gradient step on l_t(W) = 1/2 ||r_t||^2, r_t the
residual (M_W(k_t) - v_t; delta gradient descent stacks W a_t onto it). With g_t = J_t^T r_t the
gradient (J_t the Jacobian of r_t in W), a step -c g_t changes the residual by -c J_t J_t^T r_t,
whose component along r_t is c kappa_t with the curvature

    kappa_t = ||g_t||^2 / ||r_t||^2   (the Rayleigh quotient of J_t J_t^T at r_t; ||k||^2 for a linear map).

The step size c_t = theta_t s_t / (1 + theta_t kappa_t) (normalised LMS; Longhorn's and DGD's
b / (1 + b ||k||^2) for a linear map) keeps c_t kappa_t < 1: a token never overshoots its own
target along r_t, however large the input or the weights. s_t = min(1, tau / ||r_t||) clips the
error to norm tau (the inner loss is then Huber's instead of the square). Together they bound
every step, whatever the inputs, weights and curvature:

    ||c_t g_t|| = theta s sqrt(kappa) ||r|| / (1 + theta kappa) <= sqrt(theta_t) s_t ||r_t|| / 2 <= sqrt(theta_t) tau / 2.

Example:
    >>> theta = torch.tensor([0.5, 0.5]); g_sq = torch.tensor([1e6, 1.0]); r_sq = torch.tensor([1.0, 1.0])
    >>> c = inner_step(theta, g_sq, r_sq, error_clip=1.0)
    >>> bool(((c * g_sq.sqrt()) <= 0.5 ** 0.5 / 2).all())
    True
"""

from __future__ import annotations

import torch


def inner_step(theta: torch.Tensor, g_sq: torch.Tensor, r_sq: torch.Tensor, error_clip: float | None) -> torch.Tensor:
    """Per-token step size c_t (same shape as theta) from the squared norms of gradient and residual.

    Computed as theta r^2 / (r^2 + theta g^2): a zero residual (and so a zero gradient) gets a zero
    step, with no division by zero and no NaN in the backward pass.
    """
    den = r_sq + theta * g_sq  # theta / (1 + theta kappa) = theta r^2 / (r^2 + theta g^2), no division by r^2
    step = theta * r_sq / torch.where(den > 0, den, 1.0)
    if error_clip is not None:
        step = step * (error_clip * torch.rsqrt(torch.clamp(r_sq, min=error_clip**2)))
    return step


def step_bound(max_lr: float, error_clip: float | None) -> float:
    """The largest norm of one token's step, sqrt(max_lr) * error_clip / 2 (inf without a clip)."""
    return float("inf") if error_clip is None else max_lr**0.5 * error_clip / 2
