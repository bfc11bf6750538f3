"""Where this process runs Triton compiled (a CUDA machine, or Triton imported in compiled mode
before these tests), the interpreter tests cannot run in it: run them in a fresh one."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed (the 'dev' extra brings it)")

from .test_fused_steps import MODE_OK  # noqa: E402


@pytest.mark.skipif(MODE_OK, reason="the kernel tests ran in this process")
def test_kernel_files_in_fresh_process():
    here = os.path.dirname(os.path.abspath(__file__))
    files = [os.path.join(here, f) for f in ("test_fused_steps.py", "test_newton_schulz.py")]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files], env=env,
                         capture_output=True, text=True, timeout=900, cwd=os.path.dirname(os.path.dirname(here)))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "skipped" not in out.stdout.strip().splitlines()[-1], out.stdout[-4000:]  # they ran, in the interpreter
