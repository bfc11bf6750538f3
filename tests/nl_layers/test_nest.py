"""nest(): FFN blocks of existing models become CMS levels, and the model computes exactly what it did."""

import copy

import pytest
import torch
from torch import nn

import deepopt
import nl_layers
from nl_layers import CMS

from .helpers import max_diff


def _encoder(batch_first=True, norm_first=False, activation="relu", layers=2):
    layer = nn.TransformerEncoderLayer(
        16, 2, 32, dropout=0.0, batch_first=batch_first, norm_first=norm_first, activation=activation
    )
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def _check_same(original, nested, *inputs, atol=1e-6, **kwargs):
    for train in (True, False):  # train mode with dropout 0, and eval (where torch has fused fast paths)
        original.train(train), nested.train(train)
        with torch.no_grad():
            assert max_diff(nested(*inputs, **kwargs), original(*inputs, **kwargs)) < atol, f"train={train}"


@pytest.mark.parametrize("variant", ["sequential", "independent", "nested"])
@pytest.mark.parametrize("batch_first, norm_first, activation", [(True, False, "relu"), (False, True, "gelu"), (True, True, nn.GELU())])
def test_transformer_encoder_outputs_unchanged(variant, batch_first, norm_first, activation):
    model = _encoder(batch_first, norm_first, activation)
    original = copy.deepcopy(model)
    spec = nl_layers.nest(model, levels=(8, 1), variant=variant)
    assert all(isinstance(layer.linear1, CMS) for layer in model.layers)
    x = torch.randn(3, 7, 16)
    _check_same(original, model, x)
    names = dict(model.named_parameters())
    assert set(spec) <= set(names) and spec["layers.1.linear1.blocks.0.fc1.weight"] == 8
    assert spec["layers.0.linear1.blocks.1.fc2.weight"] == 1


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_encoder_fast_paths_with_padding_mask_in_eval():
    """Eval with a key-padding mask takes torch's nested-tensor fast path on the original: equal where not padded."""
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2).eval()
    original = copy.deepcopy(model)
    nl_layers.nest(model, levels=(4, 1))
    x = torch.randn(2, 6, 16)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    with torch.no_grad():
        a, b = original(x, src_key_padding_mask=pad), model(x, src_key_padding_mask=pad)
    keep = ~pad
    assert max_diff(a[keep], b[keep]) < 1e-6
    assert model.use_nested_tensor is False


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_padded_positions_on_the_fused_path_are_computed_not_zeroed():
    """What the README says of torch's fused path (eval, no_grad, key-padding mask), which nesting
    switches off: the nested model equals the original computed without it, bit for bit; the fused
    kernels differ from that by float rounding, and they return zeros at padded positions."""
    layer = nn.TransformerEncoderLayer(64, 4, 256, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2).eval()
    original = copy.deepcopy(model)
    nl_layers.nest(model, levels=(16, 1))
    x = torch.randn(3, 10, 64)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[0, 6:], pad[1, 8:] = True, True
    with torch.no_grad():
        fused, nested = original(x, src_key_padding_mask=pad), model(x, src_key_padding_mask=pad)
        unfused = original.train()(x, src_key_padding_mask=pad)  # dropout 0: the same maths, no fused path
    assert torch.equal(nested, unfused)
    assert max_diff(nested[~pad], fused[~pad]) < 1e-5
    assert torch.equal(fused[pad], torch.zeros_like(fused[pad])) and nested[pad].abs().max() > 0.1


def test_decoder_layer_and_full_transformer():
    model = nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True)
    original = copy.deepcopy(model)
    spec = nl_layers.nest(model, levels=(2, 1))
    assert any(k.startswith("decoder.layers.0.linear1.") for k in spec)
    assert any(k.startswith("encoder.layers.0.linear1.") for k in spec)
    src, tgt = torch.randn(2, 5, 16), torch.randn(2, 4, 16)
    _check_same(original, model, src, tgt)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 24), nn.SiLU(), nn.Linear(24, 8))

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


@pytest.mark.parametrize("variant", ["sequential", "independent", "nested"])
def test_user_named_module_path(variant):
    model = Net().double()
    original = copy.deepcopy(model)
    spec = nl_layers.nest(model, ffn="blocks.*.mlp", levels=(16, 4, 1), variant=variant)
    assert isinstance(model.blocks[0].mlp, CMS) and isinstance(model.blocks[1].mlp, CMS)
    assert not isinstance(model.blocks[0].attn, CMS)
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    _check_same(original, model, x, atol=1e-12)
    assert spec["blocks.1.mlp.blocks.0.0.weight"] == 16 and spec["blocks.0.mlp.blocks.2.2.bias" if variant != "sequential" else "blocks.0.mlp.blocks.2.fc2.bias"] == 1
    groups = deepopt.group_by_period(model, spec)
    assert sorted(g["period"] for g in groups) == [1, 4, 16]


def test_exact_name_and_type_selectors():
    model = Net()
    original = copy.deepcopy(model)
    nl_layers.nest(model, ffn="blocks.0.mlp", levels=(2, 1))
    assert isinstance(model.blocks[0].mlp, CMS) and not isinstance(model.blocks[1].mlp, CMS)
    by_type = Net()
    by_type.load_state_dict(original.state_dict())
    nl_layers.nest(by_type, ffn=nn.Sequential, levels=(2, 1))
    assert isinstance(by_type.blocks[1].mlp, CMS)
    x = torch.randn(2, 8)
    _check_same(original, by_type, x)


class Conv1D(nn.Module):
    """Stand-in for transformers.pytorch_utils.Conv1D: weight stored (in, out), y = x W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)


class GPT2MLP(nn.Module):
    def __init__(self, d=8, h=32):
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(h, d), Conv1D(d, h)
        self.act = nn.GELU(approximate="tanh")
        self.dropout = nn.Dropout(0.0)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GPT2Attention(nn.Module):  # has c_proj but no c_fc: must not be taken for an MLP
    def __init__(self, d=8):
        super().__init__()
        self.c_attn, self.c_proj = Conv1D(3 * d, d), Conv1D(d, d)

    def forward(self, x):
        return self.c_proj(self.c_attn(x)[..., :8])


class GPT2Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = nn.LayerNorm(8), GPT2Attention(), nn.LayerNorm(8), GPT2MLP()

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def test_gpt2_style_mlp_found_automatically():
    model = nn.Sequential(GPT2Block(), GPT2Block())
    original = copy.deepcopy(model)
    spec = nl_layers.nest(model, levels=(4, 1))
    assert isinstance(model[0].mlp, CMS) and isinstance(model[1].mlp, CMS)
    assert not isinstance(model[0].attn, CMS)
    x = torch.randn(2, 5, 8)
    _check_same(original, model, x)
    assert spec["0.mlp.blocks.0.c_fc.weight"] == 4 and spec["1.mlp.blocks.1.fc1.weight"] == 1
    assert model[0].mlp.blocks[1].fc1.out_features == 32  # new level sized like the GPT-2 MLP


def test_in_context_nesting_runs_and_starts_from_the_original():
    model = _encoder()
    original = copy.deepcopy(model)
    nl_layers.nest(model, levels=(1, 1), in_context=(None, 4), in_context_lr=0.05)
    x = torch.randn(2, 3, 16)  # shorter than one in-context chunk: nothing learned yet
    _check_same(original, model, x)
    with pytest.raises(ValueError, match="batch_first"):
        nl_layers.nest(_encoder(batch_first=False), in_context=(None, 4))


def test_bad_patterns_and_arguments():
    with pytest.raises(ValueError, match="matches no module"):
        nl_layers.nest(Net(), ffn="blocks.*.ffn")
    with pytest.raises(ValueError, match="names look like"):
        nl_layers.nest(Net(), ffn=["blocks.0.mlp", "decoder.mlp"])
    with pytest.raises(ValueError, match="found no FFN"):
        nl_layers.nest(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="no module of type"):
        nl_layers.nest(Net(), ffn=nn.Conv2d)
    with pytest.raises(TypeError, match="ffn must be"):
        nl_layers.nest(Net(), ffn=3)
    with pytest.raises(ValueError, match="model itself"):
        nl_layers.nest(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4)), ffn=nn.Sequential)
    model = Net()
    nl_layers.nest(model, ffn="blocks.*.mlp")
    with pytest.raises(ValueError, match="already"):
        nl_layers.nest(model, ffn="blocks.*.mlp")
    with pytest.raises(ValueError, match="periods"):
        nl_layers.nest(Net(), ffn="blocks.*.mlp", levels=(1, 0))
