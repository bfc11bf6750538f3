"""DeepMomentum(precondition=True): the memory reads Adam's preconditioned gradient. A bit-exact
resume through ``torch.load(weights_only=True)`` and a clear error on bad input (the fused kernels
against their reference: tests/kernels/test_fused_steps.py, cases ``deep_pre*``; the functional twin:
tests/functional/test_functional.py; the reduction to PreconditionedMomentum: test_equivalence.py)."""

import io

import pytest
import torch

import deepopt

KW = dict(lr=0.01, inner_lr=0.3, weight_decay=0.01, precondition=True, beta2=0.99, eps=1e-7)


def _params(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in ((5, 3), (7,), ())]


def _grads(ps, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in ps]


def test_resume_through_weights_only_load_is_bit_exact():
    def run(steps, resume_from=None):
        ps = _params(dtype=torch.float32)
        opt = deepopt.DeepMomentum(ps, **KW)
        if resume_from is not None:
            pstate, ostate = torch.load(io.BytesIO(resume_from), weights_only=True)
            with torch.no_grad():
                for p, v in zip(ps, pstate):
                    p.copy_(v)
            opt.load_state_dict(ostate)
        for s in steps:
            for p, g in zip(ps, _grads(ps, s)):
                p.grad = g
            opt.step()
        buf = io.BytesIO()
        torch.save(([p.detach() for p in ps], opt.state_dict()), buf)
        return ps, buf.getvalue()

    straight, _ = run(range(6))
    _, saved = run(range(3))
    resumed, _ = run(range(3, 6), saved)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_bad_precondition_names_the_parameter():
    with pytest.raises(ValueError, match="precondition must be True, False or 'factored'"):
        deepopt.DeepMomentum(_params(), precondition="adam")
    with pytest.raises(TypeError, match="normalize must be True or False"):
        deepopt.DeepMomentum(_params(), normalize="no")
    with pytest.raises(ValueError, match="beta2"):
        deepopt.DeepMomentum(_params(), precondition=True, beta2=1.5)
