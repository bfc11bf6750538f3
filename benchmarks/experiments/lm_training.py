"""Character-level language modelling on Shakespeare: data, the four models, and one training run.

Shared by the ``lm`` (model comparison) and ``lm_optimizers`` (optimizer comparison) experiments.

Data: :func:`benchmarks.data.corpus` (all 38 plays, 5.3 M characters, 84 symbols, cut into 100
contiguous blocks; every 20th block is validation, 5 %, the rest training). A training batch is
``batch`` windows of ``seq_len + 1`` characters at random offsets (seeded); validation is a fixed
set of ``val_windows`` windows. Loss in nats; bits per character = loss / ln 2.

Models (``nl_layers``), about 10 M parameters each at the ``gpu`` size (dim 384, depth 6):
``transformer`` (Transformer++: causal SDPA with RoPE, RMSNorm, SwiGLU), ``titans``
(:class:`nl_layers.TitansLM`: Titans neural memory as the mixer, then SwiGLU), ``hope``
(:class:`nl_layers.HopeLM`: self-modifying Titans then a 3-level CMS with periods 1/4/16) and
``hope_attention`` (softmax attention then the same CMS). The CMS widths are chosen so that the
three CMS levels together hold as many weights as one SwiGLU. The in-context memories (Titans,
self-modifying Titans) use chunks of 16 tokens and an inner step bound ``max_lr`` = 1e-3. At the
layers' default 0.1, and at 0.01 with chunks of 32, the chunked inner loop diverged at dim 384 on
one CPU thread (fast weights 11 -> inf within 150 tokens, after 1 to 30 AdamW steps; at 3e-3 after
60): a chunk applies up to L / (1 - eta) gradients taken at the chunk-start weights without
feedback, and the residual-MLP memory's curvature is |silu(W_in k)|^2 (about 40 here, hidden 128),
so stability needs roughly max_lr * L * |h|^2 / (1 - eta) < 2. (That was the layers of that time:
the sizes ``small`` and ``large``, used by the lm suite's ``gpu10x`` preset, leave ``chunk_size`` and
``max_lr`` at the layers' current defaults, which ran 1,000 steps x 3 seeds finite at dim 384.)

Compilation: ``cfg["compile"]`` is ``"none"`` (default), ``"blocks"`` (``model.compile_blocks()``)
or ``"full"`` (``model.compile(fullgraph=True)``), or a dict model -> mode; applied after the model
is built, with backend ``cfg.get("compile_backend", "inductor")``. ``"graphed"`` compiles nothing
but replays each training step as a CUDA graph (:func:`nl_layers.graphed_step`, the CMS periods
passed as its ``periods``), with torch's AdamW only (capturable and fused on CUDA, its rate a
tensor that the schedule fills in place): step 0 is the graph's one warm-up step on the first
batch, so the run is the eager one step for step (on a CPU it is the eager step). ``"graphed_loss"``
replays only the forward and backward (:func:`nl_layers.graphed_loss`, built on the first batch:
its warm-up passes change nothing) with any optimizer; clipping, the periods and the step stay
eager, so the run is again the eager one. Evaluation runs eager (see
:func:`evaluate`). Timing: the first ``WARM_STEPS`` = 2 steps (compilation, warm-up) are reported as
``compile_seconds``; ``ms_per_step`` and ``tokens_per_second`` time the steps after them (without
evaluations).

Training: AdamW-style runs use any optimizer spec of :mod:`benchmarks.optimizers`; a linear
warm-up over the first 5 % of steps, then cosine decay to 10 % of the peak rate (set on every
param group's ``"lr"``); gradient-norm clipping at 1.0; the CMS levels' periods are enforced for
every optimizer by :class:`deepopt.lightning.PeriodicGradients` (slow levels accumulate their
gradients and step every C steps). fp32 weights with TF32 matmuls on CUDA. A non-finite loss ends
the run as diverged; ``max_seconds`` ends it early as cut short.

Example:
    >>> cfg = dict(SIZES["tiny"], model="transformer", steps=3, eval_every=3, val_windows=2)
    >>> out = train(cfg, optimizer="AdamW", lr=3e-3, seed=0, device="cpu")
    >>> out["steps_done"], len(out["val_loss"]) == len(out["eval_steps"])
    (3, True)
"""

from __future__ import annotations

import math
import time

import torch

import nl_layers
from deepopt.lightning import PeriodicGradients

from ..data import corpus, windows
from ..optimizers import build_optimizer, select_optimizers

MODELS = ("transformer", "titans", "hope", "hope_attention")
#: the same two HOPE models with every CMS level stepping every step (periods 1/1/1: the same
#: weights, no slow levels), for ``--set lm.models=[...]``: what the levels' timescales contribute
ABLATIONS = ("hope_p1", "hope_attention_p1")
SIZES = {
    "tiny": dict(dim=32, depth=2, heads=2, chunk_size=8, max_lr=1e-3, cms_hidden=32, batch=4, seq_len=32, val_windows=4),
    "gpu": dict(dim=384, depth=6, heads=6, chunk_size=16, max_lr=1e-3, cms_hidden=512, batch=32, seq_len=256,
                val_windows=128),
    # about 10 M parameters, the fast-weight memories at their layer defaults (chunk 64; max_lr 1.0 in
    # TitansLM, 0.1 in HopeLM): stable for 1,000 steps x 3 seeds at dim 384 on an H200
    "small": dict(dim=384, depth=6, heads=6, chunk_size=None, max_lr=None, cms_hidden=512, batch=32, seq_len=256,
                  val_windows=128),
    # 40-60 M parameters (test_lm_sizes): head dim 64 as in "small", CMS widths again matching one SwiGLU
    "large": dict(dim=768, depth=8, heads=12, chunk_size=None, max_lr=None, cms_hidden=1024, batch=32, seq_len=256,
                  val_windows=128),
}
COMPILE_MODES = ("none", "blocks", "full", "graphed", "graphed_loss")
CMS_PERIODS = (1, 4, 16)
WARMUP_FRACTION, FINAL_LR_FRACTION, CLIP_NORM = 0.05, 0.1, 1.0
WARM_STEPS = 2  # untimed first steps (reported as compile_seconds); ms_per_step times the rest
# learning-rate centres per optimizer family (benchmarks.optimizers); a sweep multiplies them by 1/3, 1, 3
LR_CENTRES = {"adam": 3e-3, "muon": 2e-2, "sgd": 0.1}


def build_model(cfg: dict, vocab: int) -> torch.nn.Module:
    """One of ``MODELS`` or ``ABLATIONS`` at the sizes in ``cfg`` (dim, depth, heads, chunk_size, max_lr, cms_hidden);
    ``chunk_size`` / ``max_lr`` absent or None: the layer's default."""
    name, dim, depth, heads = cfg["model"], cfg["dim"], cfg["depth"], cfg["heads"]
    memory = {k: cfg[k] for k in ("chunk_size", "max_lr") if cfg.get(k) is not None}
    if name == "transformer":
        return nl_layers.TransformerLM(vocab, dim, depth, heads=heads)
    if name == "titans":
        return nl_layers.TitansLM(vocab, dim, depth, heads=heads, **memory)
    periods = (1,) * len(CMS_PERIODS) if name.endswith("_p1") else CMS_PERIODS
    if name in ("hope", "hope_p1"):
        return nl_layers.HopeLM(vocab, dim, depth, heads=heads, block="hope", cms_periods=periods,
                                cms_hidden=cfg["cms_hidden"], **memory)
    if name in ("hope_attention", "hope_attention_p1"):
        return nl_layers.HopeLM(vocab, dim, depth, heads=heads, block="attention", cms_periods=periods,
                                cms_hidden=cfg["cms_hidden"])
    raise ValueError(f"model must be one of {MODELS + ABLATIONS}, got {name!r}")


def compile_mode(cfg: dict) -> str:
    """``cfg["compile"]``: one of ``COMPILE_MODES`` or a dict model -> mode (absent model: "none")."""
    mode = cfg.get("compile", "none")
    if isinstance(mode, dict):
        mode = mode.get(cfg["model"], "none")
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES} (or a dict model -> mode), got {mode!r}")
    return mode


def compile_model(model: torch.nn.Module, mode: str, backend: str = "inductor") -> torch.nn.Module:
    """Compile ``model`` in place: ``full`` = ``model.compile(fullgraph=True)`` (so ``model.loss``
    runs compiled), ``blocks`` = ``model.compile_blocks()`` (each block, fullgraph; regional:
    identical blocks share one graph), ``none`` = unchanged."""
    if mode == "full":
        model.compile(fullgraph=True, backend=backend)
    elif mode == "blocks":
        model.compile_blocks(backend=backend)
    elif mode not in ("none", "graphed", "graphed_loss"):  # graphed: the step (or its loss) captured, nothing compiled
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    return model


def graphed_adamw(model: torch.nn.Module, optimizer: str, lrs: dict, device: str) -> torch.optim.Optimizer:
    """The AdamW of ``compile="graphed"`` (the spec's: no weight decay), capturable and fused on
    CUDA with a tensor rate; other optimizers are refused."""
    if optimizer != "AdamW":
        raise ValueError(f'compile="graphed" trains with torch\'s AdamW only (a CUDA graph replays it), got '
                         f"{optimizer!r}: use compile 'none', 'blocks' or 'full' for it")
    cuda = device.startswith("cuda")
    lr = torch.tensor(lrs["adam"], device=device) if cuda else lrs["adam"]
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, capturable=cuda, fused=cuda or None)


def set_lr(group: dict, value: float) -> None:
    """A param group's rate: filled in place when it is a tensor (a captured step reads it there)."""
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(value)
    else:
        group["lr"] = value


def lr_factor(step: int, steps: int) -> float:
    """Warm-up then cosine schedule factor for 0-based ``step`` of ``steps``."""
    warm = max(1, int(WARMUP_FRACTION * steps))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: torch.Tensor) -> float:
    """Mean validation loss (nats per character) over the fixed windows ``val`` (N, T + 1).

    Always eager (``torch.compiler.set_stance("force_eager")``): a compiled model would otherwise
    compile a second, no-grad graph (and one more per odd last chunk) for a few forward passes."""
    model.eval()
    total = 0.0
    with torch.compiler.set_stance("force_eager"):
        for chunk in val.split(32):
            total += float(model.loss(chunk)) * len(chunk)
    model.train()
    return total / len(val)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def train(cfg: dict, optimizer: str, lr: float, seed: int, device: str, max_seconds: float | None = None) -> dict:
    """Train ``cfg["model"]`` for ``cfg["steps"]`` steps with ``optimizer`` (a benchmarks.optimizers
    name) at peak rate ``lr`` for its family; returns the curves and timings (see module doc).

    The layers' NaN input checks are off during the run (a non-finite loss ends it as diverged, and
    the checks would cost a host sync per layer); the previous setting is restored afterwards."""
    with nl_layers.finite_checks(False):
        return _train(cfg, optimizer, lr, seed, device, max_seconds)


def _train(cfg: dict, optimizer: str, lr: float, seed: int, device: str, max_seconds: float | None) -> dict:
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    start = time.perf_counter()
    train_ids, val_ids, vocab = corpus()
    torch.manual_seed(seed)
    model = build_model(cfg, vocab).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    mode = compile_mode(cfg)
    compile_model(model, mode, cfg.get("compile_backend", "inductor"))
    spec = select_optimizers([optimizer])[optimizer]
    lrs = {family: lr if family == spec.family else LR_CENTRES[family] * lr / LR_CENTRES[spec.family]
           for family in LR_CENTRES}
    graphed = mode == "graphed"
    opt = graphed_adamw(model, optimizer, lrs, device) if graphed else build_optimizer(spec, model, lrs)
    base_lrs = [float(g["lr"]) for g in opt.param_groups]
    levels = model.level_spec() if hasattr(model, "level_spec") else {}
    periodic = PeriodicGradients(model.named_parameters(), levels) if levels and not graphed else None
    graphed_steps = loss_of = None
    gen = torch.Generator().manual_seed(10_000 + seed)
    val_gen = torch.Generator().manual_seed(12345)  # the same validation windows for every run
    seq, steps = cfg["seq_len"], cfg["steps"]
    val = windows(val_ids, torch.randint(0, len(val_ids) - seq - 1, (cfg["val_windows"],), generator=val_gen), seq + 1)
    train_ids, val = train_ids.to(device), val.to(device)
    eval_every = cfg.get("eval_every", max(1, steps // 20))
    out = {"model": cfg["model"], "optimizer": optimizer, "lr": lr, "seed": seed, "params": n_params,
           "tokens_per_step": cfg["batch"] * seq, "steps": steps, "eval_steps": [0], "val_loss": [evaluate(model, val)],
           "train_loss": [], "diverged": False, "cut_short": False, "size": cfg.get("size"), "compile": mode}
    train_seconds, compile_seconds, step = 0.0, 0.0, 0
    _sync(device)
    tick = time.perf_counter()
    for step in range(steps):
        offsets = torch.randint(0, len(train_ids) - seq - 1, (cfg["batch"],), generator=gen)
        batch = windows(train_ids, offsets.to(device), seq + 1)
        factor = lr_factor(step, steps)
        for group, base in zip(opt.param_groups, base_lrs):
            set_lr(group, base * factor)
        if graphed:  # the same step: loss, backward, clipping, the periods, AdamW (see the module doc)
            if graphed_steps is None:  # its one warm-up step is this step
                graphed_steps = nl_layers.graphed_step(model, opt, batch, max_norm=CLIP_NORM, warmup=1,
                                                       periods=levels or None, check_inputs=False)
                loss = graphed_steps.warmup_losses[-1] if device.startswith("cuda") else graphed_steps(batch)
            else:
                loss = graphed_steps(batch)
        else:
            if mode == "graphed_loss" and loss_of is None:  # forward and backward as CUDA graphs (CPU: eager)
                loss_of = nl_layers.graphed_loss(model, batch, check_inputs=False)
            loss = (loss_of or model.loss)(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
            if periodic is not None:
                periodic.before_step()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if step == WARM_STEPS - 1:  # the first steps (compilation, allocator and autotuning warm-up) apart
            _sync(device)
            now = time.perf_counter()
            compile_seconds, tick = compile_seconds + now - tick, now
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            _sync(device)
            if step < WARM_STEPS:
                compile_seconds += time.perf_counter() - tick
            else:
                train_seconds += time.perf_counter() - tick
            value = float(loss.detach())
            out["train_loss"].append(value)
            out["eval_steps"].append(step + 1)
            out["val_loss"].append(evaluate(model, val) if math.isfinite(value) else math.inf)
            if not math.isfinite(out["val_loss"][-1]):
                out["diverged"] = True
                break
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                out["cut_short"] = step + 1 < steps
                break
            _sync(device)
            tick = time.perf_counter()
    out["steps_done"] = out["eval_steps"][-1]
    out["final_val_loss"] = out["val_loss"][-1]
    out["final_bpc"] = out["final_val_loss"] / math.log(2)
    timed = out["steps_done"] - WARM_STEPS
    out["compile_seconds"] = compile_seconds
    out["ms_per_step"] = 1000 * (train_seconds / timed if timed > 0 else compile_seconds / max(1, out["steps_done"]))
    out["tokens_per_second"] = out["tokens_per_step"] / max(out["ms_per_step"], 1e-9) * 1000
    out["seconds"] = time.perf_counter() - start
    if device.startswith("cuda"):
        out["peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def measure_step_ms(cfg: dict, device: str, steps: int = 4) -> float:
    """Milliseconds per AdamW training step of ``cfg["model"]`` (after 2 warm-up steps)."""
    warm = dict(cfg, steps=2, eval_every=10**9, val_windows=1)
    train(warm, "AdamW", 1e-3, 0, device)
    timed = dict(cfg, steps=steps, eval_every=steps, val_windows=1)
    return train(timed, "AdamW", 1e-3, 0, device)["ms_per_step"]
