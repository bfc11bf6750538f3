"""Tests of deepopt.kernels. On CPU the Triton kernels run in Triton's interpreter, which must be
switched on before the first ``import triton`` of the process (Triton builds its standard library,
e.g. ``tl.sum``, for one mode at import): hence here, before any test module of this package."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
