"""Manual check (not collected by pytest): fla_gated's Functions on CPU, through Triton's interpreter.

Needs two temporary patches, applied only in this process: Triton's autotuner takes its first
config (benchmarking needs a GPU), and fla's kernel loop counters get a no-op ``.to`` (the
interpreter hands plain ints to code that casts them). Then, for each rule, our Function (forced,
as on Hopper + old Triton) against the float32 torch chunked path and against fla's public op:
outputs, final state and the gradients of q, k, v, lr, log_decay and M_0, as ||a - b|| / ||b||.
bfloat16 does not work in the interpreter (numpy has no bfloat16); the GPU tests cover it.

    OMP_NUM_THREADS=1 python tests/nl_layers/check_fla_gated_interpreter.py [float32|float16] [T]
"""

import builtins
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # this checkout's nl_layers

import triton.runtime.autotuner as autotuner  # noqa: E402

autotuner.Autotuner.prune_configs = lambda self, kwargs, *args: self.configs[:1]


class _Int(int):
    def to(self, *args, **kwargs):
        return self


def _range(*args):
    return (_Int(i) for i in builtins.range(*args))


import fla.ops.common.chunk_delta_h  # noqa: E402,F401
import fla.ops.common.chunk_h  # noqa: E402,F401
import fla.ops.common.chunk_o  # noqa: E402,F401
import fla.ops.gated_delta_rule.chunk  # noqa: E402,F401
import fla.ops.simple_gla.chunk  # noqa: E402,F401

for _name, _module in list(sys.modules.items()):
    if _name.startswith("fla.ops"):
        _module.range = _range

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nl_layers.ops.linear_memory import fla as ops_fla  # noqa: E402
from nl_layers.ops.linear_memory import linear_memory_chunked  # noqa: E402
from nl_layers.ops.linear_memory.rules import step_sizes  # noqa: E402

NAMES = ["q", "k", "v", "lr", "log_decay", "M_0"]


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def _loss(y, m):
    g = torch.Generator().manual_seed(1)
    return (y.float() * torch.randn(y.shape, generator=g)).sum() + (m.float() * torch.randn(m.shape, generator=g)).sum()


def _fla(inputs, rule, own):
    ops_fla._FORCE_OWN_GATED_BACKWARD = own
    assert ops_fla.fla_gated.unavailable() is None, ops_fla.fla_gated.unavailable()
    q, k, v, lr, log_decay = (x.transpose(1, 2) for x in inputs[:5])  # fla's layout (B, T, H, ...)
    m0 = inputs[5]
    y, m = ops_fla.chunked(q, k, v, step_sizes(rule, k, lr, torch.float32), log_decay, m0, delta=rule != "hebbian")
    y = y.transpose(1, 2)
    return y, m, torch.autograd.grad(_loss(y, m), inputs)


def main(dtype=torch.float32, t=150):
    for rule in ("delta", "dgd", "hebbian"):
        torch.manual_seed(0)
        b, h, dk, dv = 2, 2, 32, 16
        q, k = (F.normalize(torch.randn(b, h, t, dk), dim=-1) for _ in range(2))
        tensors = [q, k, torch.randn(b, h, t, dv), torch.sigmoid(torch.randn(b, h, t)),
                   F.logsigmoid(torch.randn(b, h, t) + 2), torch.randn(b, h, dv, dk)]
        low = [x.to(dtype).requires_grad_() for x in tensors]
        ref = [x.detach().float().requires_grad_() for x in low]
        y, m, grads = _fla(low, rule, own=True)
        y_fla, m_fla, grads_fla = _fla(low, rule, own=False)
        q, k, v, lr, log_decay, m0 = ref
        y_ref, m_ref = linear_memory_chunked(q, k, v, rule=rule, lr=lr, log_decay=log_decay, initial_state=m0)
        grads_ref = torch.autograd.grad(_loss(y_ref, m_ref), ref)
        for label, (y2, m2, g2) in [("torch", (y_ref, m_ref, grads_ref)), ("fla", (y_fla, m_fla, grads_fla))]:
            errors = {"y": _rel(y, y2), "M_T": _rel(m, m2)}
            errors.update({n: _rel(a, r) for n, a, r in zip(NAMES, grads, g2)})
            print(f"{rule:8s} {dtype} T={t} ours vs {label:5s}", " ".join(f"{n}={e:.1e}" for n, e in errors.items()))


if __name__ == "__main__":
    main(getattr(torch, sys.argv[1]) if len(sys.argv) > 1 else torch.float32,
         int(sys.argv[2]) if len(sys.argv) > 2 else 150)
