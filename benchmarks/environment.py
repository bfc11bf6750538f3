"""What every result file records about where and how it was made.

Example:
    >>> info = describe(seeds=[0], command="python -m benchmarks run --suite quick")
    >>> sorted(info) == ["command", "date", "machine", "seeds", "versions"]
    True
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys

import torch


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> dict:
    """CPU model, core count, vector capability (and whether bf16 matmuls are native on it), torch
    threads, and the GPU name when ``device`` is CUDA."""
    from deepopt.levels.precision import native_bf16_matmul

    info = {"cpu": cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_native_bf16_matmul": native_bf16_matmul(torch.device("cpu")),
            "platform": platform.platform(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def versions() -> dict:
    """python, torch and deepopt versions, the git commit, and optional packages when installed
    (heavyball, schedulefree, matplotlib, rich, triton, fla-core, flash-linear-attention, titans-pytorch)."""
    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    from importlib import metadata

    for dist in ("deepopt", "heavyball", "schedulefree", "matplotlib", "rich", "triton", "fla-core",
                 "flash-linear-attention", "titans-pytorch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    out["git_commit"] = git_commit()
    return out


def git_commit(root: str | None = None) -> str | None:
    """The checkout's (``root``, default this repository's) short commit, ``+modified`` when tracked files differ from it (then the code
    that ran is not that commit's); ``DEEPOPT_GIT_COMMIT`` overrides both, for copies of a tree
    whose ``.git`` is not the source's (a remote machine). None without git.

    Example:
        >>> os.environ["DEEPOPT_GIT_COMMIT"] = "abc1234"; git_commit()
        'abc1234'
        >>> del os.environ["DEEPOPT_GIT_COMMIT"]
    """
    if os.environ.get("DEEPOPT_GIT_COMMIT"):
        return os.environ["DEEPOPT_GIT_COMMIT"]
    import subprocess

    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip()
        changed = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + "+modified" if changed else head) or None


def describe(seeds, command: str | None = None, device: str = "cpu") -> dict:
    """The header of a result file: machine, versions, seeds, command line and UTC date."""
    if command is None:
        command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return {"machine": machine(device), "versions": versions(), "seeds": list(seeds), "command": command,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
