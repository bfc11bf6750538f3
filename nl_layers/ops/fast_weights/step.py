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
from torch.autograd.function import once_differentiable

from ..._function import Function


def inner_step_reference(theta: torch.Tensor, g_sq: torch.Tensor, r_sq: torch.Tensor, error_clip: float | None) -> torch.Tensor:
    """:func:`inner_step` written with plain autograd operators (its backward is autograd's): the
    reference the fused version is tested against.

    Computed as theta r^2 / (r^2 + theta g^2): a zero residual (and so a zero gradient) gets a zero
    step, with no division by zero and no NaN in the backward pass.
    """
    den = r_sq + theta * g_sq  # theta / (1 + theta kappa) = theta r^2 / (r^2 + theta g^2), no division by r^2
    step = theta * r_sq / torch.where(den > 0, den, 1.0)
    if error_clip is not None:
        step = step * (error_clip * torch.rsqrt(torch.clamp(r_sq, min=error_clip**2)))
    return step


class _InnerStep(Function):
    """c = theta s r^2 / D with D = r^2 + theta g^2 (1 where D = 0) and s = tau / sqrt(max(r^2, tau^2))
    (s = 1 without a clip), with a hand-written backward. With f = s / D, u = theta f and
    rho = r^2 / D (all finite: D >= r^2 and D > 0):

        dc/dtheta = f r^2 rho                       (s r^2 (D - theta g^2) / D^2, as D - theta g^2 = r^2)
        dc/dg^2   = -theta^2 f rho
        dc/dr^2   = u (1 - [r^2 >= tau^2] / 2) - theta f rho

    (ds/dr^2 = -s / (2 r^2) where the clip is active, r^2 >= tau^2 as torch.clamp's gradient, and
    c ds/(s dr^2) = -u / 2 there). Where D = 0 (r^2 = theta g^2 = 0) the where() gives D no gradient,
    so dc/dr^2 = theta s and the others are 0, which the formulas give with D = 1, r^2 = 0. About a
    third of the operators of autograd's backward of :func:`inner_step_reference`, same values.

    ``negate``: the output is -c, with f and u negated as well (f = -s / D): the backward is then
    unchanged (every gradient is a product of the output's gradient with f or u), and -c costs no
    extra operator backward (forward: none with an error clip, where the sign joins its factor; one
    negation without).
    """

    @staticmethod
    def forward(theta, g_sq, r_sq, error_clip, negate):
        den = torch.addcmul(r_sq, theta, g_sq)
        den = den.masked_fill_(den <= 0, 1.0)
        sign = -1.0 if negate else 1.0
        if error_clip is None:
            f = den.reciprocal() if not negate else torch.reciprocal(den).neg_()
        else:
            f = torch.clamp(r_sq, min=error_clip**2).rsqrt_()  # s / tau (r_sq may broadcast)
            if error_clip * sign != 1.0:
                f = f.mul_(error_clip * sign)
            f = f / den  # (-)s / D
        u = theta * f
        return u * r_sq, den, f, u

    @staticmethod
    def setup_context(ctx, inputs, output):
        theta, g_sq, r_sq, ctx.clip, _ = inputs
        _, den, f, u = output
        ctx.mark_non_differentiable(den, f, u)
        ctx.set_materialize_grads(False)
        ctx.shapes = theta.shape, g_sq.shape, r_sq.shape
        ctx.save_for_backward(theta, r_sq, den, f, u)

    @staticmethod
    @once_differentiable
    def backward(ctx, gc, *_):
        if gc is None:
            return None, None, None, None, None
        theta, r_sq, den, f, u = ctx.saved_tensors
        a = torch.mul(gc, f).mul_(r_sq / den)  # gc f rho
        b = a * theta  # gc theta f rho
        g_theta = a * r_sq
        g_g = torch.mul(b, theta).neg_()
        g_r = torch.mul(gc, u)
        if ctx.clip is not None:
            g_r = g_r.addcmul_(g_r, r_sq >= ctx.clip**2, value=-0.5)  # halved where the clip is active
        g_r = g_r.sub_(b)
        grads = [g if g.shape == s else g.sum_to_size(s) for g, s in zip((g_theta, g_g, g_r), ctx.shapes)]
        return *grads, None, None


def inner_step(
    theta: torch.Tensor, g_sq: torch.Tensor, r_sq: torch.Tensor, error_clip: float | None, negate: bool = False
) -> torch.Tensor:
    """Per-token step size c_t (same shape as theta) from the squared norms of gradient and residual.

    c = theta s r^2 / (r^2 + theta g^2) (s the error clip's factor): a zero residual (and so a zero
    gradient) gets a zero step, with no division by zero and no NaN in the backward pass. One
    autograd node with a hand-written backward (:class:`_InnerStep`); the same values and gradients
    as :func:`inner_step_reference` in far fewer operators (first derivatives only). ``negate``: return
    -c (the update's scale, -c g) at no extra operator with an error clip (one negation without).
    """
    return _InnerStep.apply(theta, g_sq, r_sq, error_clip, negate)[0]


def step_bound(max_lr: float, error_clip: float | None) -> float:
    """The largest norm of one token's step, sqrt(max_lr) * error_clip / 2 (inf without a clip)."""
    return float("inf") if error_clip is None else max_lr**0.5 * error_clip / 2
