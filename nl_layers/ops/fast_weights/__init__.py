"""Fast-weight memories (Titans, self-modifying Titans): the momentum/decay scan of per-token updates.

- ``scan``: the reference (:func:`scan_recurrent`, token by token) and the chunk-parallel form
  (:class:`ChunkPlan`, rank-1 dual form and dense updates);
- ``cross``: the start states of all chunks at once (a small operator, or a grouped scan);
- ``step``: the bounded inner step size (normalised LMS with a clipped error);
- ``decay_kernels``, ``read_kernels``: the token form's element-wise L x L passes (the decay-mix
  matrix and its gradient; the read's backward) as Triton kernels, the torch paths beside them;
- ``engines``: one gradient-anchor segment, all tokens at once (closed-form rank-1 gradients of
  the built-in memories, or ``vmap(grad)`` for any module).
"""

from .engines import AnalyticEngine, FuncEngine, make_engine
from .cross import scan_maps
from .scan import ChunkPlan, dense_all, dense_states, rank1_read, rank1_states, scan_recurrent
from .step import inner_step, inner_step_reference, step_bound

__all__ = [
    "AnalyticEngine",
    "ChunkPlan",
    "FuncEngine",
    "dense_all",
    "dense_states",
    "inner_step",
    "inner_step_reference",
    "make_engine",
    "rank1_read",
    "rank1_states",
    "scan_maps",
    "scan_recurrent",
    "step_bound",
]
