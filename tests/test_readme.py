"""Every ```python block of README.md runs as pasted, each in a fresh Python process.

A block that imports a package which is not installed (an optional extra) skips; a block with a
``# needs: cuda`` line skips without a CUDA device. Blocks run in a temporary directory (some
write checkpoints or logs), with this checkout first on the import path.
"""

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(first line number, source)`` of every fenced ```python block."""
    blocks, start, body = [], None, []
    for number, line in enumerate(text.splitlines(), 1):
        if start is None and line.strip() == "```python":
            start, body = number + 1, []
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(body) + "\n"))
            start = None
        elif start is not None:
            body.append(line)
    return blocks


def missing_packages(source: str) -> list[str]:
    """Top-level packages the block imports that are not installed."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return sorted(n for n in names if importlib.util.find_spec(n) is None)


BLOCKS = python_blocks((ROOT / "README.md").read_text())


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 13


@pytest.mark.parametrize("start, source", BLOCKS, ids=[f"line{start}" for start, _ in BLOCKS])
def test_readme_block_runs_as_pasted(start, source, tmp_path):
    if "# needs: cuda" in source and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    missing = missing_packages(source)
    if missing:
        pytest.skip(f"needs {', '.join(missing)}, which is not installed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", source], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, f"README.md block at line {start} failed:\n{out.stderr[-3000:]}"
