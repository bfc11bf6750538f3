"""torch.compile(fullgraph=True): every layer and language model traces as one graph, with no host
synchronisation, and the compiled forward and backward equal eager mode.

The CPU tests use the "aot_eager" backend (dynamo + AOTAutograd, no code generation: fast); the
GPU tests compile with inductor and run under ``torch.cuda.set_sync_debug_mode("error")``.
"""

import copy

import pytest
import torch
import torch._dynamo
from functorch.compile import make_boxed_func
from torch import nn
from torch._dynamo.backends.common import aot_autograd

import nl_layers

V = 30
# aten ops that copy a device value to the host (a synchronisation on a GPU) or need its value for a shape
SYNC_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default"}


def tokens(b=2, t=12):
    return torch.randint(0, V, (b, t))


def seq(b=2, t=12, d=16):
    return torch.randn(b, t, d)


class GPT2MLP(nn.Module):
    """Hugging Face GPT-2-style MLP (Conv1D weights stored (in, out))."""

    def __init__(self, d=16, h=32):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(d, h), nn.Linear(h, d)
        self.c_fc.weight = nn.Parameter(torch.randn(d, h) * 0.1)
        self.c_proj.weight = nn.Parameter(torch.randn(h, d) * 0.1)

    def forward(self, x):
        return torch.nn.functional.gelu(x @ self.c_fc.weight + self.c_fc.bias) @ self.c_proj.weight + self.c_proj.bias


def nested_encoder(**kwargs):
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    nl_layers.nest(model, levels=(4, 1), **kwargs)
    return model


def nested_mlp():
    model = nn.Sequential(nn.Linear(16, 16), nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)))
    nl_layers.nest(model, ffn="1", levels=(1, 2), variant="independent")
    return model


def nested_gpt2():
    model = nn.Sequential(nn.Linear(16, 16), GPT2MLP())
    nl_layers.nest(model, levels=(2, 1), in_context=(None, 4), in_context_lr=0.1)
    return model


CASES = {
    "transformer_lm": (lambda: nl_layers.TransformerLM(V, 16, 2, heads=2), tokens),
    "hope_lm_attention": (lambda: nl_layers.HopeLM(V, 16, 2, heads=2, block="attention", cms_periods=(1, 2)), tokens),
    "hope_lm_attention_in_context": (
        lambda: nl_layers.HopeLM(V, 16, 2, heads=2, block="attention", cms_periods=(1, 2), cms_in_context=(None, 4), cms_in_context_lr=0.1),
        tokens,
    ),
    "titans_lm": (lambda: nl_layers.TitansLM(V, 16, 2, heads=2, chunk_size=4), tokens),
    "hope_lm": (lambda: nl_layers.HopeLM(V, 16, 2, heads=2, chunk_size=4, cms_periods=(1, 2)), tokens),
    "attention_memory": (lambda: nl_layers.AttentionMemory(16, 2), seq),
    "attention_memory_chunked": (lambda: nl_layers.AttentionMemory(16, 2, impl="memory", chunk_size=5), seq),
    "attention_memory_noncausal": (lambda: nl_layers.AttentionMemory(16, 2, causal=False, rope=False), seq),
    "cms_sequential": (lambda: nl_layers.CMS(16, 32, periods=(1, 4)), seq),
    "cms_independent": (lambda: nl_layers.CMS(16, 32, periods=(1, 4), variant="independent"), seq),
    "cms_nested": (lambda: nl_layers.CMS(16, 32, periods=(1, 4), variant="nested"), seq),
    "cms_in_context_sequential": (lambda: nl_layers.CMS(16, 32, periods=(1, 4), in_context=(None, 5), in_context_lr=0.1), seq),
    "cms_in_context_independent": (
        lambda: nl_layers.CMS(16, 32, periods=(1, 4), variant="independent", in_context=(3, 5), in_context_lr=0.1),
        seq,
    ),
    "cms_in_context_nested": (
        lambda: nl_layers.CMS(16, 32, periods=(1, 4), variant="nested", in_context=(8, 4), in_context_lr=0.1),
        seq,
    ),
    "hope_attention_block": (lambda: nl_layers.HopeAttentionBlock(16, 2, cms_periods=(1, 4)), seq),
    "nest_transformer_encoder": (nested_encoder, seq),
    "nest_transformer_encoder_in_context": (lambda: nested_encoder(in_context=(None, 4), in_context_lr=0.1), seq),
    "nest_mlp_pattern": (nested_mlp, seq),
    "nest_gpt2_mlp_in_context": (nested_gpt2, seq),
    "linear_memory": (lambda: nl_layers.LinearMemory(16, 2, chunk_size=4), seq),
    "linear_memory_hebbian": (lambda: nl_layers.LinearMemory(16, 2, rule="hebbian", chunk_size=4, decay=False), seq),
    "linear_memory_dgd": (lambda: nl_layers.LinearMemory(16, 2, rule="dgd", chunk_size=5, data_dependent_lr=False), seq),
}
LMS = ["transformer_lm", "hope_lm_attention", "hope_lm_attention_in_context", "titans_lm", "hope_lm"]


def first(out):
    return out[0] if isinstance(out, tuple) else out


def forward_backward(model, x):
    """Output and gradients (w.r.t. the parameters and a float input) of sum(out * fixed weights)."""
    model.zero_grad(set_to_none=True)
    if x.is_floating_point():
        x = x.detach().clone().requires_grad_()
    out = first(model(x))
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if x.is_floating_point():
        grads["input"] = x.grad.clone()
    return out.detach(), grads


def assert_close(a, b, atol=1e-5):
    out_a, grads_a = a
    out_b, grads_b = b
    assert torch.allclose(out_a, out_b, atol=atol, rtol=1e-4), float((out_a - out_b).abs().max())
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        diff = float((grads_a[name] - grads_b[name]).abs().max())
        assert torch.allclose(grads_a[name], grads_b[name], atol=atol, rtol=1e-4), f"gradient of {name} differs by {diff}"


def recording_backend(graphs: list):
    """The "aot_eager" backend that also keeps the forward and backward ATen graphs."""

    def keep(gm, _example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=keep, bw_compiler=keep)


@pytest.mark.parametrize("name", CASES)
def test_compiles_as_one_graph_without_synchronisation_and_equals_eager(name):
    """fullgraph=True fails on any graph break (an .item(), a data-dependent branch or shape); the
    ATen graphs are then scanned for the ops that would still copy a device value to the host."""
    build, make_input = CASES[name]
    torch.manual_seed(0)
    model = build()
    x = make_input()
    graphs = []
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=recording_backend(graphs))
    assert_close(forward_backward(compiled, x), forward_backward(model, x))
    assert len(graphs) == 2  # one forward and one backward graph
    ops = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert not ops & SYNC_OPS


@pytest.mark.parametrize("name", LMS)
def test_compile_blocks_compiles_one_graph_for_every_block_and_equals_eager(name):
    torch.manual_seed(0)
    model = CASES[name][0]()
    ref = copy.deepcopy(model)
    x = tokens()
    graphs = []
    torch._dynamo.reset()
    assert model.compile_blocks(backend=recording_backend(graphs)) is model
    assert_close(forward_backward(model, x), forward_backward(ref, x))
    assert len(model.blocks) == 2 and len(graphs) == 2  # one forward and one backward graph, shared by both blocks


@pytest.mark.parametrize("name, split", [("transformer_lm", [4, 1, 1, 5]), ("hope_lm_attention_in_context", [6, 5])])
def test_compiled_lm_streams_like_eager(name, split):
    """A prompt, then pieces: the state (KV cache, in-context CMS weights) passes between compiled
    calls (a few recompilations while shapes and positions become dynamic)."""
    torch.manual_seed(0)
    lm = CASES[name][0]().eval()
    x = tokens(2, 11)
    torch._dynamo.reset()
    compiled = torch.compile(lm, fullgraph=True, backend="aot_eager")
    parts, state = [], None
    with torch.no_grad():  # inference: streaming generation
        for piece in torch.split(x, split, dim=1):
            out, state = compiled(piece, state, return_state=True)
            parts.append(out)
        assert torch.allclose(torch.cat(parts, 1), lm(x), atol=1e-5)


def test_value_checks_are_eager_only():
    lm = nl_layers.TransformerLM(V, 16, 1, heads=2)
    bad = torch.tensor([[1, V]])
    with pytest.raises(ValueError, match=r"\[0, 30\)"):
        lm(bad)
    with nl_layers.value_checks(False), pytest.raises(IndexError):  # the embedding's own bounds check
        lm(bad)
    torch._dynamo.reset()
    compiled = torch.compile(lm, fullgraph=True, backend="aot_eager")
    with pytest.raises(IndexError):  # traced without the check: no graph break
        compiled(bad)
    assert nl_layers.value_checks_enabled() and nl_layers.finite_checks_enabled()


# -- GPU: inductor, and no synchronisation at all in a compiled forward -----------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name", LMS)
def test_compiled_lm_forward_does_not_synchronise_on_cuda(name, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # whatever an earlier test left set
    build, make_input = CASES[name]
    model, x = build().cuda(), make_input().cuda()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    ref = copy.deepcopy(model)
    expected = first(ref(x))
    first(compiled(x))  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = first(compiled(x))
        with nl_layers.value_checks(False):  # eager with value checks off: no synchronisation either
            first(model(x))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.allclose(out, expected, atol=1e-4, rtol=1e-3)


@pytest.mark.gpu
def test_out_of_range_token_is_a_value_error_on_cuda():
    lm = nl_layers.TransformerLM(V, 16, 1, heads=2).cuda()
    with pytest.raises(ValueError, match=r"\[0, 30\)"):
        lm(torch.tensor([[1, V]], device="cuda"))
