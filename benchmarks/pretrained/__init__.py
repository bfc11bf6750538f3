"""Task families for meta-training an optimizer and testing it untuned on held-out families.

See :mod:`benchmarks.pretrained.families`: ``META_FAMILIES`` (seen in meta-training),
``HELD_OUT_FAMILIES`` (never seen), ``FAMILIES`` (name -> family); ``family.sample(generator)``
gives a :class:`PretrainTask` with pure ``loss(params, step)`` and ``eval_loss(params)``.
"""

from .families import FAMILIES, HELD_OUT_FAMILIES, META_FAMILIES, Family, PretrainTask, mnist1d_data

__all__ = ["FAMILIES", "HELD_OUT_FAMILIES", "META_FAMILIES", "Family", "PretrainTask", "mnist1d_data"]
