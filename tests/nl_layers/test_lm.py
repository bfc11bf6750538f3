"""HOPE blocks, HopeLM, TitansLM and TransformerLM: streaming, generation, level specification, training on Shakespeare."""

import pytest
import torch

import deepopt
import nl_layers
from nl_layers.data import CharTokenizer, random_batches, shakespeare, unigram_entropy

from .helpers import max_diff
from ..example_imports import run_examples


@pytest.mark.parametrize(
    "block",
    [
        lambda: nl_layers.HopeBlock(16, heads=2, chunk_size=4, cms_periods=(1, 4)),
        lambda: nl_layers.HopeBlock(16, heads=2, chunk_size=4, cms_periods=(1, 4), cms_in_context=(None, 3), cms_in_context_lr=0.1),
        lambda: nl_layers.HopeAttentionBlock(16, heads=2, cms_periods=(1,)),
    ],
    ids=["hope", "hope-in-context", "attention"],
)
def test_blocks_stream(block):
    torch.manual_seed(0)
    blk = block().double()
    x = torch.randn(2, 19, 16, dtype=torch.float64)
    y, _ = blk(x)
    parts, state = [], None
    for piece in torch.split(x, [5, 1, 13], dim=1):
        out, state = blk(piece, state)
        parts.append(out)
    assert max_diff(torch.cat(parts, 1), y) < 1e-12
    assert state.detach() is not None


@pytest.mark.parametrize("kind", ["hope", "attention", "transformer", "titans"])
def test_language_models_stream_and_generate_greedily(kind):
    torch.manual_seed(0)
    if kind == "transformer":
        lm = nl_layers.TransformerLM(30, dim=16, depth=2, heads=2)
    elif kind == "titans":
        lm = nl_layers.TitansLM(30, dim=16, depth=2, heads=2, chunk_size=4)
    else:
        lm = nl_layers.HopeLM(30, dim=16, depth=2, heads=2, block=kind, chunk_size=4, cms_periods=(1, 2))
    lm = lm.double().eval()
    tokens = torch.randint(0, 30, (2, 11))
    logits = lm(tokens)
    assert logits.shape == (2, 11, 30)
    part1, state = lm(tokens[:, :4], return_state=True)
    part2, _ = lm(tokens[:, 4:], state, return_state=True)
    assert max_diff(torch.cat([part1, part2], 1), logits) < 1e-10
    out = lm.generate(tokens[:, :3], max_new_tokens=6, temperature=0)
    seq = tokens[:, :3]
    for _ in range(6):  # greedy decoding by recomputing the whole prefix every time
        seq = torch.cat([seq, lm(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    one = lm.generate(tokens[0, :3], max_new_tokens=4, top_k=5, generator=torch.Generator().manual_seed(0))
    assert one.shape == (7,) and torch.equal(one[:3], tokens[0, :3])


def test_level_spec_of_hope_lm():
    lm = nl_layers.HopeLM(30, dim=16, depth=2, heads=2, cms_periods=(1, 8))
    spec = lm.level_spec()
    names = dict(lm.named_parameters())
    assert spec and all(n in names for n in spec)
    assert spec["blocks.1.cms.blocks.1.fc2.weight"] == 8
    groups = deepopt.group_by_period(lm, spec)
    assert sorted(g["period"] for g in groups) == [1, 8]


def test_bad_tokens_and_arguments():
    lm = nl_layers.HopeLM(30, dim=16, depth=1, heads=2)
    with pytest.raises(ValueError, match=r"\[0, 30\)"):
        lm(torch.tensor([[1, 2, 30]]))
    with pytest.raises(ValueError, match=r"\[0, 30\)"):
        lm(torch.tensor([[-1, 2]]))
    with pytest.raises(TypeError, match="integer"):
        lm(torch.rand(1, 4))
    with pytest.raises(ValueError, match="batch, time"):
        lm(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm.generate(torch.tensor([1, 2]), max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        lm.generate(torch.tensor([1, 2]), max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match="block"):
        nl_layers.HopeLM(30, dim=16, depth=1, block="mamba")
    with pytest.raises(ValueError, match="depth"):
        nl_layers.TransformerLM(30, dim=16, depth=0)
    with pytest.raises(ValueError, match="heads"):
        nl_layers.TitansLM(30, dim=16, depth=1, heads=0)
    with pytest.raises(ValueError, match="state"):
        lm(torch.tensor([[1, 2]]), state=(None, None))


@pytest.mark.slow
def test_hope_lm_learns_shakespeare():
    """A tiny HopeLM (self-modifying Titans + CMS) trained for 200 steps on CPU gets well below the
    unigram entropy (3.30 nats on this slice; the run reaches about 2.12)."""
    text = shakespeare("tragedies")[:100_000]
    tok = CharTokenizer(text)
    ids = tok.encode(text)
    unigram = unigram_entropy(ids, tok.vocab_size)
    torch.manual_seed(0)
    lm = nl_layers.HopeLM(tok.vocab_size, dim=32, depth=2, heads=2, chunk_size=32, cms_hidden=64)
    steps = 200
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps, pct_start=0.1)
    gen, losses = torch.Generator().manual_seed(0), []
    for _ in range(steps):
        loss = lm.loss(random_batches(ids, 8, 65, gen))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    final = sum(losses[-25:]) / 25
    assert 3.0 < unigram < 3.6
    assert final < unigram - 0.9, (final, unigram)
    sample = tok.decode(lm.generate(tok.encode("ROMEO"), max_new_tokens=20, generator=gen))
    assert sample.startswith("ROMEO") and len(sample) == 25


def test_value_checks_switch_covers_tokens_and_keeps_the_old_names():
    lm = nl_layers.TransformerLM(30, dim=16, depth=1, heads=2)
    bad = torch.tensor([[1, 30]])
    assert nl_layers.value_checks_enabled()
    with nl_layers.finite_checks(False):  # old name, same switch: the token range is not checked
        assert not nl_layers.value_checks_enabled() and not nl_layers.finite_checks_enabled()
        with pytest.raises(IndexError):  # the embedding's own bounds check, no ValueError
            lm(bad)
    nl_layers.set_value_checks(False)
    try:
        lm(torch.tensor([[1, 2]]))
        assert not nl_layers.finite_checks_enabled()
    finally:
        nl_layers.set_finite_checks(True)
    with pytest.raises(ValueError, match=r"set_value_checks\(False\)"):
        lm(bad)
    ids = torch.tensor([[1, 29, 0]])
    for dtype in (torch.int32, torch.int16, torch.uint8):  # every accepted integer dtype embeds
        assert torch.equal(lm(ids.to(dtype)), lm(ids))
        with pytest.raises(ValueError, match=r"\[0, 30\)"):
            lm(bad.to(dtype))


@pytest.mark.parametrize(
    "build",
    [
        lambda: nl_layers.TransformerLM(30, dim=16, depth=2, heads=2),
        lambda: nl_layers.HopeLM(30, dim=16, depth=2, heads=2, block="attention", cms_periods=(1, 2)),
        lambda: nl_layers.HopeLM(30, dim=16, depth=2, heads=2, block="attention", cms_periods=(1, 2), cms_in_context=(None, 4)),
        lambda: nl_layers.HopeLM(30, dim=16, depth=2, heads=2, chunk_size=4),
    ],
    ids=["transformer", "attention", "attention-in-context", "hope"],
)
def test_bfloat16_autocast(build):
    """Under CPU bfloat16 autocast the float32 models run, stream, generate and train, close to float32."""
    lm = build()
    tokens = torch.randint(0, 30, (2, 13))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lm(tokens)
        part1, state = lm(tokens[:, :5], return_state=True)
        part2, _ = lm(tokens[:, 5:], state, return_state=True)
        loss = lm.loss(tokens)
        sample = lm.generate(tokens[0, :3], max_new_tokens=4)
    loss.backward()
    assert torch.isfinite(logits).all() and sample.shape == (7,)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in lm.parameters())
    reference = lm(tokens).detach()
    assert (logits.float() - reference).abs().max() < 0.05 * reference.abs().max() + 0.02
    assert (torch.cat([part1, part2], 1).float() - logits.float()).abs().max() < 0.05


@pytest.mark.parametrize("name", ["nl_layers._checks", "nl_layers._modules", "nl_layers._kernels", "nl_layers.graphed",
                                  "nl_layers.ops.normalize_kernels", "nl_layers.ops.row_kernels"])
def test_docstring_examples_of_the_helpers_run(name):
    import doctest
    import importlib

    result = run_examples(importlib.import_module(name), extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize("kind", ["titans", "titans-anchored", "hope", "hope-anchored", "attention"])
def test_training_forward_skips_end_states_with_the_same_logits_and_gradients(kind):
    """return_state=False passes need_state=False to the blocks: the same logits and parameter
    gradients as a forward that forms (and returns) the end states; these are still returned when asked."""
    torch.manual_seed(0)
    anchor = 4 if kind.endswith("anchored") else None
    if kind.startswith("titans"):
        lm = nl_layers.TitansLM(30, dim=16, depth=2, heads=2, chunk_size=4, anchor_size=anchor)
    else:
        lm = nl_layers.HopeLM(30, dim=16, depth=2, heads=2, block=kind.split("-")[0], chunk_size=4, anchor_size=anchor, cms_periods=(1, 2))
    lm = lm.double()
    tokens = torch.randint(0, 30, (2, 11))
    w = torch.randn(2, 11, 30, dtype=torch.float64)
    params = list(lm.parameters())
    with_state, state = lm(tokens, return_state=True)
    without = lm(tokens)
    assert len(state) == 2 and all(s is not None for s in state)
    assert max_diff(with_state, without) < 1e-13
    g_with = torch.autograd.grad((with_state * w).sum(), params, allow_unused=True)
    g_without = torch.autograd.grad((without * w).sum(), params, allow_unused=True)
    for a, b in zip(g_with, g_without):
        assert (a is None) == (b is None) and (a is None or max_diff(a, b) < 1e-12)
    _, state2 = lm(tokens[:, 4:], state, return_state=True)  # a returned state still streams on
    assert all(s is not None for s in state2)


def _count_finite_checks(monkeypatch):
    """Count the value checks of layer inputs (each is one host synchronisation on a GPU)."""
    import nl_layers._checks as checks

    calls = []
    real = checks.check_finite
    def counted(x, name):
        if checks._run_value_checks():  # the check runs: a reduction and, on a GPU, a synchronisation
            calls.append(name)
        return real(x, name)

    monkeypatch.setattr(checks, "check_finite", counted)
    for mod in ("nl_layers.hope", "nl_layers.self_modifying", "nl_layers.memory.neural", "nl_layers.memory.attention",
                "nl_layers.memory.linear", "nl_layers.cms_in_context"):
        m = __import__(mod, fromlist=["_"])
        if hasattr(m, "check_finite"):
            monkeypatch.setattr(m, "check_finite", checks.check_finite)
    return calls, checks


@pytest.mark.parametrize("make", [lambda: nl_layers.TitansLM(30, dim=16, depth=2, heads=2),
                                  lambda: nl_layers.HopeLM(30, dim=16, depth=2, heads=2)])
def test_lm_layers_skip_value_checks_of_their_inner_activations(monkeypatch, make):
    """The LM checks its token ids; its layers' inputs are its own activations, so they are not
    value-checked (on a GPU each check is a host synchronisation per layer call)."""
    calls, checks = _count_finite_checks(monkeypatch)
    lm = make()
    lm(torch.tensor([[1, 2, 3]])).sum().backward()
    assert calls == [] and nl_layers.value_checks_enabled() and not getattr(checks._INNER, "depth", 0)
    block = lm.blocks[0]
    x = torch.randn(1, 3, 16)
    with pytest.raises(ValueError, match="NaN or Inf"):  # a layer called on its own still checks its input
        (block.memory if hasattr(block, "memory") else block.mixer)(x.masked_fill(x > 0, float("nan")))
    assert not getattr(checks._INNER, "depth", 0)


def test_inner_activations_is_thread_local_and_restored_after_an_error():
    import threading

    import nl_layers._checks as checks

    seen = []
    with pytest.raises(RuntimeError):
        with checks.inner_activations():
            worker = threading.Thread(target=lambda: seen.append(checks._run_value_checks()))
            worker.start()
            worker.join()
            seen.append(checks._run_value_checks())
            raise RuntimeError("boom")
    assert seen == [True, False] and checks._run_value_checks()
