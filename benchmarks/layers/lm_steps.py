"""Language-model training steps for the ``layers`` suite's LM table.

One step: zero the gradients, the next-token loss of a (batch, seq + 1) random token batch (three
batches rotate), backward, one AdamW step (fused on CUDA). ``precision`` "fp32" keeps fp32 weights
and activations (the suite turns TF32 matmuls on for the whole run); "bf16" runs the forward under
bf16 autocast (weights and AdamW stay fp32). Models: ``TransformerLM``,
``HopeLM(block="attention")``, ``HopeLM()`` and ``TitansLM``, at their default arguments apart
from the sizes.

Example:
    >>> cases = lm_cases(vocab=32, dim=16, depth=1, heads=2, device="cpu", precision="fp32")
    >>> [c.name for c in cases]
    ['TransformerLM', 'HopeLM(block="attention")', 'HopeLM()', 'TitansLM']
    >>> step = cases[0].make(2, 8)
    >>> step()
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .mixers import Case, construct, module_config

PRECISIONS = ("fp32", "bf16")


def add_size_arguments(parser, device: str = "cuda") -> None:
    """The LM measurement tools' shared options: ``--device`` and the model and batch sizes (dim
    384, depth 6, 4 heads, batch 32 x 256 tokens: the size the README's LM step figures use)."""
    parser.add_argument("--device", default=device)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=256)


def lm_builders(vocab: int, dim: int, depth: int, heads: int) -> dict[str, Callable[[], torch.nn.Module]]:
    """name -> constructor of each language model at the given sizes (defaults otherwise)."""
    import nl_layers

    return {
        "TransformerLM": lambda: construct(nl_layers.TransformerLM, vocab, dim, depth, heads=heads),
        'HopeLM(block="attention")': lambda: construct(nl_layers.HopeLM, vocab, dim, depth, heads=heads, block="attention"),
        "HopeLM()": lambda: construct(nl_layers.HopeLM, vocab, dim, depth, heads=heads),
        "TitansLM": lambda: construct(nl_layers.TitansLM, vocab, dim, depth, heads=heads),
    }


def lm_case(name: str, build: Callable[[], torch.nn.Module], vocab: int, device: str, precision: str) -> Case:
    """A case whose ``make(batch, seq)`` returns one AdamW training step (see the module doc)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    case = Case(name, "ours", lambda b, t: None)

    def make(batch: int, seq: int):
        model = build().to(device)
        case.config.update(module_config(model), params=sum(p.numel() for p in model.parameters()))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.startswith("cuda"))
        batches = [torch.randint(0, vocab, (batch, seq + 1), device=device) for _ in range(3)]
        turn = [0]
        autocast = (lambda: torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)) \
            if precision == "bf16" else contextlib.nullcontext

        def step():
            i = turn[0] = (turn[0] + 1) % 3
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = model.loss(batches[i])
            loss.backward()
            opt.step()

        return step

    case.make = make
    return case


def lm_cases(vocab: int, dim: int, depth: int, heads: int, device: str, precision: str) -> list[Case]:
    """The four language models' training steps at one precision."""
    return [lm_case(name, build, vocab, device, precision)
            for name, build in lm_builders(vocab, dim, depth, heads).items()]
