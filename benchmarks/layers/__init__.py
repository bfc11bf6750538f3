"""The ``layers`` suite (GPU): nl_layers mixers and language models, timed against SDPA and peers.

``python -m benchmarks run --suite layers --device cuda`` runs :mod:`.run`'s three parts (mixers
at T = 1K ... 64K with 64K tokens per call; the Titans comparison with titans-pytorch; the LM
training step table) and writes ``results.json``, ``results.md`` and ``layers.png`` to
``./runs/layers-<time>/`` (``--update-results``: ``benchmarks/results/layers/``). Modules: :mod:`.timing`
(clocks, caps, OOM), :mod:`.mixers`, :mod:`.lm_steps`, :mod:`.run`, :mod:`.report`, :mod:`.suite`.

Example:
    >>> from benchmarks.layers import LayersConfig
    >>> LayersConfig().lengths
    (1024, 4096, 16384, 65536)
"""

from .run import LayersConfig, run_layers

__all__ = ["LayersConfig", "run_layers"]
