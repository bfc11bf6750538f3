"""``Function``: ``torch.autograd.Function`` without the per-call signature binding in eager mode.

torch's ``Function.apply`` binds the arguments to ``forward``'s signature (``inspect.signature``) on
every call when a ``setup_context`` is defined, which is needed only for torch.func transforms
(vmap, grad, jvp). That binding costs ~15 us per call on the host, more than the kernels some
of the layers' Functions launch. This base class skips it when no transform is active (every
argument must then be positional, without defaults in ``forward``); under a transform it calls
torch's ``apply`` unchanged. ``torch.compile`` traces it as any other autograd Function.

Example:
    >>> class Square(Function):
    ...     @staticmethod
    ...     def forward(x):
    ...         return x * x
    ...     @staticmethod
    ...     def setup_context(ctx, inputs, output):
    ...         ctx.save_for_backward(inputs[0])
    ...     @staticmethod
    ...     def backward(ctx, g):
    ...         return 2 * g * ctx.saved_tensors[0]
    >>> x = torch.tensor([3.0], requires_grad=True)
    >>> Square.apply(x).backward(); x.grad
    tensor([6.])
"""

from __future__ import annotations

import torch


class Function(torch.autograd.Function):
    """An autograd Function whose ``apply`` takes positional arguments only (see the module doc)."""

    @classmethod
    def apply(cls, *args):
        if torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*args)  # the C apply, without the binding
