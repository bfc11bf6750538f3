"""Bad input gets a clear error naming the parameter; non-finite gradients follow the policy."""

import io
import warnings

import pytest
import torch
from torch import nn

import deepopt

from .helpers import make, tiny_model, train

NAMES = sorted(deepopt.OPTIMIZERS)

INVALID = [  # (optimizer, keyword, bad value, name that the message must contain)
    (name, "lr", -1.0, "lr") for name in NAMES
] + [(name, "weight_decay", -0.1, "weight_decay") for name in NAMES] + [
    ("MomentumMemory", "momentum", -0.5, "momentum"),
    ("MomentumMemory", "dampening", -1.0, "dampening"),
    ("AdamMemory", "betas", (1.5, 0.9), "betas"),
    ("AdamMemory", "betas", (0.9,), "betas"),
    ("AdamMemory", "eps", -1e-8, "eps"),
    ("AdamMemory", "form", "ema2", "form"),
    ("MuonMemory", "momentum", -0.1, "momentum"),
    ("MuonMemory", "ns_steps", -1, "ns_steps"),
    ("MuonMemory", "ns_coefficients", (1.0, 2.0), "ns_coefficients"),
    ("MuonMemory", "adjust_lr_fn", "fast", "adjust_lr_fn"),
    ("MuonMemory", "fallback_lr_ratio", -1.0, "fallback_lr_ratio"),
    ("MuonMemory", "fallback_betas", (0.9, 1.2), "fallback_betas"),
    ("PreconditionedMomentum", "beta2", 1.0, "beta2"),
    ("PreconditionedMomentum", "precond_period", 0, "period"),
    ("DeltaMomentum", "delta", 1.5, "delta"),
    ("DeltaMomentum", "momentum", -1.0, "momentum"),
    ("DeepMomentum", "inner_lr", -0.1, "inner_lr"),
    ("DeepMomentum", "sigma", "tanh", "sigma"),
    ("DeepMomentum", "hidden", 0, "hidden"),
    ("M3", "betas", (0.9, 0.999), "betas"),
    ("M3", "frequency", 0, "period"),
    ("M3", "form", "fast", "form"),
    ("M3", "target_rms", -1.0, "target_rms"),
    ("M3", "alpha", 0.5, None),  # valid: control row
]


@pytest.mark.parametrize("name,key,value,word", INVALID)
def test_invalid_hyperparameter_raises_value_error_naming_it(name, key, value, word):
    model = tiny_model()
    if word is None:
        make(name, model, **{key: value})
        return
    with pytest.raises(ValueError, match=word):
        make(name, model, **{key: value})


@pytest.mark.parametrize("name", NAMES)
def test_invalid_group_added_later_is_rejected_and_not_kept(name):
    model = tiny_model()
    params = list(model.parameters())
    opt = make(name, model, params=params[:2])
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": params[2:], "lr": -1.0})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="period"):
        opt.add_param_group({"params": params[2:], "period": 0})


@pytest.mark.parametrize("name", ["impl", "nonfinite"])
def test_invalid_mode_flags(name):
    with pytest.raises(ValueError, match=name):
        deepopt.AdamMemory(tiny_model().parameters(), **{name: "bogus"})


@pytest.mark.parametrize("name", NAMES)
def test_sparse_gradients_raise(name):
    emb = nn.Embedding(10, 4, sparse=True)
    model = nn.ModuleDict({"emb": emb, "lin": nn.Linear(4, 2)})
    opt = make(name, model)
    model["lin"](emb(torch.tensor([1, 2, 3]))).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("name", NAMES)
def test_complex_parameters_raise(name):
    p = nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))
    model = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="complex"):
        make(name, model, params=[p])


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_from_another_optimizer_is_refused(name):
    model = tiny_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, sgd, 2)
    opt = make(name, model)
    with pytest.raises(ValueError, match="not written by|another optimizer"):
        opt.load_state_dict(sgd.state_dict())


def test_checkpoint_of_other_deepopt_optimizer_is_refused():
    model = tiny_model()
    adam = make("AdamMemory", model)
    train(model, adam, 2)
    with pytest.raises(ValueError, match="not written by|another optimizer"):
        make("MomentumMemory", model).load_state_dict(adam.state_dict())


def test_checkpoint_with_mismatched_shapes_is_refused():
    small = nn.Linear(3, 2)
    opt = deepopt.AdamMemory(small.parameters())
    train_step(small, opt)
    big = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="shape"):
        deepopt.AdamMemory(big.parameters()).load_state_dict(opt.state_dict())


def train_step(model, opt):
    model(torch.randn(2, model.in_features)).square().sum().backward()
    opt.step()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_is_skipped_without_touching_params_or_state(name, bad):
    model = tiny_model()
    opt = make(name, model)
    train(model, opt, 2)
    before_p = [p.detach().clone() for p in model.parameters()]
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    opt.zero_grad()
    from .helpers import loss_of
    loss_of(model, 5).backward()
    next(model.parameters()).grad[0, 0] = bad
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before_p))
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)["state"]
    for i, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            assert torch.equal(v, saved[i][k]), k
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, opt, 1, start=6)  # training continues normally
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_raise_policy():
    model = tiny_model()
    opt = deepopt.AdamMemory(model.parameters(), nonfinite="raise")
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_dgd_without_model_explains_what_to_pass():
    with pytest.raises(ValueError, match="model"):
        deepopt.DGD(nn.Linear(2, 2).parameters(), lr=0.1)


def test_group_by_period_rejects_unmatched_and_conflicting_patterns():
    model = tiny_model()
    with pytest.raises(ValueError, match="matches no parameter"):
        deepopt.group_by_period(model, {"encoder.*": 4})
    with pytest.raises(ValueError, match="disjoint"):
        deepopt.group_by_period(model, {"0.*": 2, "0.weight": 4})
    with pytest.raises(ValueError, match="period"):
        deepopt.group_by_period(model, {"0.*": 0})


@pytest.mark.parametrize("name", ["MuonMemory", "M3", "DeltaMomentum", "DeepMomentum"])
def test_matrix_optimizer_refuses_fsdp1_flat_parameters(name):
    flat = nn.Parameter(torch.randn(40))
    flat._is_flat_param = True  # the marker FSDP1 puts on its FlatParameter
    with pytest.raises(ValueError, match="FSDP1"):
        make(name, nn.Linear(2, 2), params=[flat])


def test_elementwise_optimizer_accepts_fsdp1_flat_parameters():
    flat = nn.Parameter(torch.randn(40))
    flat._is_flat_param = True
    make("AdamMemory", nn.Linear(2, 2), params=[flat])
