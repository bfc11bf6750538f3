"""The pool suites: the Nested Learning claims tested on one or more GPUs, each a module here.

``lm`` (Transformer++ vs Titans vs HOPE vs HOPE-attention on Shakespeare characters),
``lm_optimizers`` (optimizers on the best of those), ``continual_levels`` (fine-tuning vs
multi-timescale levels vs nested CMS vs EWC; ``continual`` in the records) and ``recall`` (MQAR by
memory rule and width). They run through :mod:`benchmarks.experiments.run`; see
``python -m benchmarks list``.

Example:
    >>> from benchmarks.experiments.run import POOL_SUITES
    >>> sorted(POOL_SUITES)
    ['continual_levels', 'lm', 'lm_optimizers', 'recall']
"""
