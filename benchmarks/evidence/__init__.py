"""Evidence runs (issue 9): the Nested Learning paper's claims, tested at small scale on one or more GPUs.

Experiments (one module each, run through :mod:`benchmarks.evidence.pool`):
``lm`` (Transformer++ vs Titans vs HOPE vs HOPE-attention on Shakespeare characters),
``lm_optimizers`` (optimizers on the best of those models), ``continual`` (fine-tuning vs
multi-timescale levels vs nested CMS vs EWC), ``recall`` (multi-query associative recall by memory
rule and width). See ``python -m benchmarks.evidence --help``.
"""
