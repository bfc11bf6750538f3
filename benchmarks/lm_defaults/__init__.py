"""``python -m benchmarks.lm_defaults``: the language models at their default arguments, trained.

Every ``nl_layers`` LM (TransformerLM, TitansLM, HopeLM, HopeLM with attention blocks) at its
constructor defaults apart from the sizes trains 1,000 AdamW steps on Shakespeare characters for
3 seeds; reported per model and seed: finite or the step of the first NaN, initial and final train
loss, validation bits per character, ms per step. Modules: :mod:`.train` (one job),
:mod:`.report` (tables, plot), :mod:`.cli` (devices, jobs, output folder).

Example:
    >>> from benchmarks.lm_defaults import MODELS
    >>> MODELS
    ('transformer', 'titans', 'hope', 'hope_attention')
"""

from .train import MODELS

__all__ = ["MODELS"]
