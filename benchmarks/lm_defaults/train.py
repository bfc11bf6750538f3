"""One ``lm_defaults`` job: a language model at its default arguments trained with AdamW.

The model is built at its constructor defaults apart from the sizes (vocabulary, ``dim``,
``depth``, and ``heads`` only when given). Data: Shakespeare characters, the train / validation
split of :func:`benchmarks.data.corpus`; a batch is ``batch`` random windows of
``seq_len + 1`` characters (seeded). AdamW (torch defaults, fused on CUDA) at ``lr`` after a linear
warm-up of ``warmup`` steps, then constant; gradient norm clipped at ``clip`` (0: off); CMS levels
with periods > 1 (``level_spec``) go through :class:`deepopt.lightning.PeriodicGradients`.

Losses stay on the device and are read every ``check_every`` steps (no host sync per step): the
first non-finite loss ends the run, its step (1-based) recorded; ``max_seconds`` (counted from the
job's start, checked after every step) ends it as cut short. ms per step is the median over those
windows (the first one, with its warm-up, left out when there are others). Validation bits per
character at the end, over ``val_windows`` fixed windows.

Example:
    >>> out = run(dict(SMOKE, model="transformer", seed=0), "cpu")  # doctest: +ELLIPSIS
    lm_defaults: [cpu] transformer seed 0: start
    lm_defaults: [cpu] transformer seed 0: done after 4 steps, ... ms/step, val bpc ...
    >>> out["steps_done"], out["finite"], out["first_nan_step"]
    (4, True, None)
"""

from __future__ import annotations

import contextlib
import inspect
import math
import statistics
import time

import torch

MODELS = ("transformer", "titans", "hope", "hope_attention")
CLASSES = {"transformer": ("TransformerLM", {}), "titans": ("TitansLM", {}), "hope": ("HopeLM", {}),
           "hope_attention": ("HopeLM", {"block": "attention"})}
GPU = dict(dim=384, depth=6, heads=None, batch=32, seq_len=256, steps=1000, lr=1e-3, warmup=50, clip=1.0,
           check_every=25, val_windows=64, precision="fp32")
SMOKE = dict(GPU, dim=32, depth=2, batch=4, seq_len=32, steps=4, warmup=2, check_every=2, val_windows=2)


def build_model(name: str, vocab: int, dim: int, depth: int, heads: int | None = None) -> torch.nn.Module:
    """``MODELS[name]`` at its defaults apart from the sizes (``heads`` only when not None)."""
    import nl_layers

    if name not in CLASSES:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    cls_name, extra = CLASSES[name]
    sizes = {} if heads is None else {"heads": heads}
    return getattr(nl_layers, cls_name)(vocab, dim, depth, **sizes, **extra)


def default_heads(name: str) -> int | None:
    """The constructor's default ``heads`` of ``MODELS[name]``."""
    import nl_layers

    param = inspect.signature(getattr(nl_layers, CLASSES[name][0])).parameters.get("heads")
    return None if param is None else param.default


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def run(params: dict, device: str) -> dict:
    """Train one model and seed (``params``: a preset dict plus ``model`` and ``seed``; the pool
    adds ``max_seconds``); returns the JSON-able result described in the module doc."""
    from ..layers.run import run_settings

    print(f"lm_defaults: [{device}] {params['model']} seed {params['seed']}: start", flush=True)
    with run_settings():  # NaN checks off, TF32 on; both restored after the job (in-process callers too)
        out = _train(params, device)
    end = f"first NaN at step {out['first_nan_step']}" if out["first_nan_step"] else \
        ("cut short" if out["cut_short"] else "done")
    print(f"lm_defaults: [{device}] {params['model']} seed {params['seed']}: {end} after {out['steps_done']} steps, "
          f"{out['ms_per_step']:.1f} ms/step, val bpc {out['val_bpc'] if out['val_bpc'] is None else round(out['val_bpc'], 3)}",
          flush=True)
    return out


def _train(p: dict, device: str) -> dict:
    from deepopt.lightning import PeriodicGradients

    from ..data import corpus, windows
    from ..experiments.lm_training import evaluate

    start = time.perf_counter()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    train_ids, val_ids, vocab = corpus()
    torch.manual_seed(p["seed"])
    model = build_model(p["model"], vocab, p["dim"], p["depth"], p.get("heads")).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], fused=cuda)
    levels = model.level_spec() if hasattr(model, "level_spec") else {}
    periodic = PeriodicGradients(model.named_parameters(), levels) if any(v > 1 for v in levels.values()) else None
    autocast = (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) \
        if p["precision"] == "bf16" else contextlib.nullcontext
    gen = torch.Generator().manual_seed(10_000 + p["seed"])
    seq, steps = p["seq_len"], p["steps"]
    val_gen = torch.Generator().manual_seed(12345)  # the same validation windows for every run
    val = windows(val_ids, torch.randint(0, len(val_ids) - seq - 1, (p["val_windows"],), generator=val_gen), seq + 1)
    train_ids, val = train_ids.to(device), val.to(device)
    losses = torch.full((steps,), float("nan"), device=device)
    out = {"model": p["model"], "seed": p["seed"], "params": sum(x.numel() for x in model.parameters()),
           "heads": p.get("heads") or default_heads(p["model"]), "vocab": vocab, "steps": steps,
           "periodic_levels": periodic is not None, "first_nan_step": None, "cut_short": False}
    host: list[float] = []
    window_ms: list[float] = []
    max_seconds = p.get("max_seconds")
    _sync(device)
    tick, done = time.perf_counter(), 0
    for step in range(steps):
        offsets = torch.randint(0, len(train_ids) - seq - 1, (p["batch"],), generator=gen)
        batch = windows(train_ids, offsets.to(device), seq + 1)
        with autocast():
            loss = model.loss(batch)
        loss.backward()
        if p["clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), p["clip"])
        if periodic is not None:
            periodic.before_step()
        for group in opt.param_groups:
            group["lr"] = p["lr"] * min(1.0, (step + 1) / max(1, p["warmup"]))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses[step] = loss.detach().float()
        over = max_seconds is not None and time.perf_counter() - start > max_seconds  # no sync: cheap every step
        if (step + 1) % p["check_every"] and step + 1 < steps and not over:
            continue
        _sync(device)
        now = time.perf_counter()
        window_ms.append(1e3 * (now - tick) / (step + 1 - done))
        host += losses[done:step + 1].tolist()
        done = step + 1
        bad = [i for i, v in enumerate(host) if not math.isfinite(v)]
        if bad:
            out["first_nan_step"] = bad[0] + 1
            break
        if max_seconds is not None and now - start > max_seconds:
            out["cut_short"] = done < steps
            break
        tick = time.perf_counter()
    finite = out["first_nan_step"] is None
    good = host if finite else host[:out["first_nan_step"] - 1]
    with autocast():
        val_loss = evaluate(model, val) if finite else math.nan
    out.update(steps_done=done, finite=finite and math.isfinite(val_loss),
               initial_train_loss=host[0] if host else None,
               final_train_loss=statistics.fmean(good[-p["check_every"]:]) if good else None,
               val_bpc=val_loss / math.log(2) if math.isfinite(val_loss) else None,
               ms_per_step=statistics.median(window_ms[1:] if len(window_ms) > 1 else window_ms),
               train_loss=[v if math.isfinite(v) else None for v in host], seconds=time.perf_counter() - start,
               precision=p["precision"], lr=p["lr"], warmup=p["warmup"], clip=p["clip"], batch=p["batch"], seq_len=seq)
    if cuda:
        out["peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out
