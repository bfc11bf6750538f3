"""The kernels compile for an H100 (sm_90) without a GPU, and aligned launches vectorize.

Compiled in a subprocess: the CPU tests run Triton's interpreter (``TRITON_INTERPRET=1``), which
replaces the compiler in their own process.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed (the 'dev' extra brings it)")

SCRIPT = r"""
import re, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from deepopt.levels.adaptive import triton_kernels as K
fn = K.adam_kernel
sig = {"ptrs": "*i64", "numel": "*i64", "blk_row": "*i32", "blk_start": "*i64", "found": "*fp32", "scal": "*fp32"}
sig.update({k: "fp32" for k in ("c_m", "c_g", "c_v", "c_g2", "eps", "decay", "wd")})
consts = dict(NCOL=4, NSCAL=2, P_DT=tl.float32, G_DT=tl.float32, S_DT=tl.float32, COUPLED=False, BLOCK=4096,
              ALIGNED=sys.argv[1] == "1", CHECK=True)
full = {n: sig.get(n, "constexpr") for n in fn.arg_names}
attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if full[n].startswith("*")}
try:
    k = triton.compile(ASTSource(fn=fn, signature=full, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
except (RuntimeError, FileNotFoundError) as err:
    print("NO-COMPILER", err)
    sys.exit(0)
print("VEC", len(re.findall(r"ld\.global(\.\w+)*\.v4", k.asm["ptx"])))
"""


@pytest.mark.parametrize("aligned", [True, False])
def test_adam_kernel_compiles_for_sm90_and_vectorizes_when_aligned(aligned):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, "1" if aligned else "0"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if out.stdout.startswith("NO-COMPILER"):
        pytest.skip(f"this Triton build has no sm_90 compiler: {out.stdout}")
    vec = int(out.stdout.split("VEC")[1])
    assert (vec >= 16) if aligned else (vec == 0)
