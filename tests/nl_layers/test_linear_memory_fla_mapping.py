"""The documented parameter mapping onto flash-linear-attention, checked on CPU against fla's own
pure-torch reference recurrences (fla's state is K-first there: [B, H, K, V] = our M^T).

    hebbian -> simple GLA with v -> b*v, g = log_decay, scale = 1
    delta   -> gated delta rule with beta = b, g = log_decay, scale = 1
    dgd     -> gated delta rule with beta = b / (1 + b ||k||^2)
"""

import pytest
import torch
import torch.nn.functional as F

from nl_layers.memory.linear import RULES, linear_memory_recurrent
from nl_layers.ops.linear_memory.rules import step_sizes

from .helpers import max_diff

naive_delta = pytest.importorskip("fla.ops.gated_delta_rule.naive", reason="flash-linear-attention is not installed")
naive_gla = pytest.importorskip("fla.ops.simple_gla.naive", reason="flash-linear-attention is not installed")


@pytest.mark.parametrize("rule", RULES)
def test_our_rules_are_fla_reference_recurrences_under_the_mapping(rule):
    b, h, t, dk, dv = 2, 3, 37, 8, 5
    q, k = F.normalize(torch.randn(b, t, h, dk), dim=-1), F.normalize(torch.randn(b, t, h, dk), dim=-1)
    v, lr = torch.randn(b, t, h, dv), torch.rand(b, t, h)
    log_decay, m0 = F.logsigmoid(torch.randn(b, t, h) + 2), torch.randn(b, h, dv, dk)
    y, m = linear_memory_recurrent(q, k, v, rule=rule, lr=lr, log_decay=log_decay, initial_state=m0, layout="bthd")
    beta = step_sizes(rule, k, lr, torch.float32)
    if rule == "hebbian":
        y_fla, s_fla = naive_gla.naive_recurrent_simple_gla(
            q, k, beta[..., None] * v, log_decay, scale=1.0, initial_state=m0.transpose(-1, -2), output_final_state=True
        )
    else:
        y_fla, s_fla = naive_delta.naive_recurrent_gated_delta_rule(
            q, k, v, beta, log_decay, scale=1.0, initial_state=m0.transpose(-1, -2), output_final_state=True
        )
    assert max_diff(y, y_fla) < 1e-5 and max_diff(m, s_fla.transpose(-1, -2)) < 1e-5
