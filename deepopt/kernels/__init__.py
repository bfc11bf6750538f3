"""The launch plumbing shared by every fused step (below the level families, above nothing).

* :mod:`deepopt.kernels.launch`: :class:`FusedStep` (the base of the families' fused steps: step
  counting, dtype grouping, kernel or reference, the non-finite flag), :func:`launch`,
  :func:`apply_rows`, :func:`apply_directions` (the shell's foreach ``W <- W - lr d``) and the
  float32 row helpers of the kernels' references;
* :mod:`deepopt.kernels.tables`: multi-tensor launch tables (one launch per parameter list);
* :mod:`deepopt.kernels.triton_lib`: the ``@triton.jit`` helpers every kernel uses (imported on
  first use; Triton is optional).

The fused steps themselves live beside their math, one folder per family in
:mod:`deepopt.levels` (e.g. :mod:`deepopt.levels.adaptive.fused` and
:mod:`deepopt.levels.adaptive.triton_kernels` next to :mod:`deepopt.levels.adaptive.level`);
:func:`deepopt.levels.fused_step_for` picks the one for a chain. fp32 state for bf16 parameters:
``state_dtype=torch.float32`` in a param group.

Example:
    >>> import torch
    >>> from deepopt.kernels import RowSet
    >>> RowSet([[torch.zeros(5), torch.ones(5)]]).tables(block=4).blk_start.tolist()
    [0, 4]
"""

from .launch import BLOCK, IMPLS, FusedStep, apply_directions, apply_rows, interpreting, launch
from .tables import RowSet, scalar_table

__all__ = ["BLOCK", "IMPLS", "FusedStep", "RowSet", "apply_directions", "apply_rows", "interpreting", "launch",
           "scalar_table"]
