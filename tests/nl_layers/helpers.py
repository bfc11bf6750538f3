"""Shared helpers for the nl_layers tests."""

import torch


def max_diff(a, b) -> float:
    return float((a - b).detach().abs().max())


def grads_of(outputs, inputs):
    """Gradients of sum(outputs * fixed random weights) w.r.t. inputs (None where unused)."""
    g = torch.Generator().manual_seed(123)
    weights = torch.randn(outputs.shape, generator=g, dtype=outputs.dtype)
    return torch.autograd.grad((outputs * weights).sum(), inputs, allow_unused=True, retain_graph=True)


def assert_grads_close(module, x, out_a, out_b, atol=1e-10, module_b=None):
    """out_a (of ``module``) and out_b (of ``module_b``, default the same module, with the same
    parameter values) have the same gradients w.r.t. x and every parameter."""
    module_b = module if module_b is None else module_b
    named_a = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    named_b = dict(module_b.named_parameters())
    ga = grads_of(out_a, [x] + [p for _, p in named_a])
    gb = grads_of(out_b, [x] + [named_b[n] for n, _ in named_a])
    for name, a, b in zip(["x"] + [n for n, _ in named_a], ga, gb):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.allclose(a, b, atol=atol, rtol=1e-8), f"gradient of {name} differs by {max_diff(a, b)}"


def assert_need_state_false_matches(layer, given: bool):
    """``layer(x, state, need_state=False)`` returns (y, None) with the same y and gradients (x and
    every parameter) as the full forward; ``given``: from a state of an earlier call (float64)."""
    x = torch.randn(2, 14, 16, dtype=torch.float64, requires_grad=True)
    state = layer(torch.randn(2, 5, 16, dtype=torch.float64))[1] if given else None
    y, full = layer(x, state)
    y_skip, none = layer(x, state, need_state=False)
    assert none is None and full is not None and max_diff(y, y_skip) < 1e-13
    w = torch.randn_like(y)
    inputs = [x] + list(layer.parameters())
    for a, b in zip(torch.autograd.grad((y * w).sum(), inputs, allow_unused=True, retain_graph=True),
                    torch.autograd.grad((y_skip * w).sum(), inputs, allow_unused=True)):
        assert (a is None) == (b is None) and (a is None or max_diff(a, b) < 1e-12)


class HostData:
    """``with HostData() as made: ...``: ``made`` lists ``"file:line code"`` for every tensor built
    from Python data (``torch.tensor`` / ``torch.as_tensor`` of numbers or lists: ``aten.lift_fresh``)
    inside the block, forward and backward.

    On a GPU such a tensor is filled on the host and copied to the device, and a CUDA graph capture
    refuses that copy ("Cannot copy between CPU and CUDA tensors during CUDA graph capture unless
    the CPU tensor is pinned"), so code that ``nl_layers.graphed_loss`` / ``graphed_step`` captures
    must build none; the same call on the CPU shows them (the other host-to-device pattern, ``.to``
    of a tensor made on the CPU, is invisible on a CPU and not checked here)."""

    def __init__(self):
        self.made: list[str] = []
        self._mode = None

    def __enter__(self) -> list[str]:
        import traceback

        from torch.utils._python_dispatch import TorchDispatchMode

        made = self.made

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten.lift_fresh.default:
                    frames = [f for f in traceback.extract_stack()[:-1]
                              if "/torch/" not in f.filename and not f.filename.endswith("helpers.py")]
                    made.append(f"{frames[-1].filename}:{frames[-1].lineno} {frames[-1].line}" if frames else "?")
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()
        self._mode.__enter__()
        return made

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)
