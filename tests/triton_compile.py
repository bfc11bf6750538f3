"""Compile checks of Triton kernels on a CPU: launches recorded in Triton's interpreter, compiled by
Triton's own compiler for an sm90 target in a fresh process without the interpreter (no GPU needed).

The interpreter (which runs the kernels' CPU tests) does not type-check what the compiler does, e.g.
a runtime ``if`` whose two sides assign one name with different shapes runs there and fails to
compile. ``record(monkeypatch, run)`` returns the distinct launches of ``run()`` (kernel, signature
of pointer dtypes and integer/float arguments, constexpr values, integers equal to 1 specialised as
Triton does); ``compile_failures(launches)`` compiles each (processes side by side) and returns the failures.
"""

import inspect
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float64: "*fp64",
        torch.int64: "*i64", torch.int32: "*i32", torch.int8: "*i8", torch.bool: "*i1"}

_COMPILE = r"""
import importlib, json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
failed = []
for k in json.load(sys.stdin):
    fn = getattr(importlib.import_module(k["module"]), k["name"])
    consts = {name: (tl.dtype(v["dtype"]) if isinstance(v, dict) else v) for name, v in k["consts"].items()}
    sig = {n: ("constexpr" if n in consts else k["sig"][n]) for n in fn.arg_names}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()})
    try:
        triton.compile(src, target=GPUTarget("cuda", 90, 32))
    except Exception as err:  # noqa: BLE001 - reported below
        failed.append(f"{k['module']}.{k['name']} {k['sig']} {k['consts']}: {str(err).splitlines()[-1][:300]}")
print(json.dumps(failed))
"""


def _is_tl_dtype(v) -> bool:
    import triton.language as tl

    return isinstance(v, tl.dtype)


def record(monkeypatch, run) -> list[dict]:
    """The distinct launches (kernel, signature, constexprs) of ``run()`` in the interpreter."""
    from triton.runtime import interpreter

    seen: dict[str, dict] = {}
    launch = interpreter.GridExecutor.__call__

    def record(self, *args, **kwargs):
        values = dict(zip(self.arg_names, args)) | kwargs
        sig, consts = {}, {}
        for name in self.arg_names:
            v = values.get(name, inspect.signature(self.fn).parameters[name].default)
            if name in self.constexprs or v is None or (isinstance(v, int) and not isinstance(v, bool) and v == 1):
                consts[name] = {"dtype": str(v)} if _is_tl_dtype(v) else v
            elif isinstance(v, torch.Tensor):
                sig[name] = _PTR[v.dtype]
            elif isinstance(v, bool):
                sig[name] = "i1"
            elif isinstance(v, int):
                sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            else:
                sig[name] = "fp32"
        entry = {"module": self.fn.__module__, "name": self.fn.__name__, "sig": sig, "consts": consts}
        seen.setdefault(json.dumps(entry, sort_keys=True), entry)
        return launch(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", record)
    run()
    return list(seen.values())


def compile_failures(launches: list[dict], workers: int | None = None) -> list[str]:
    """Each launch compiled for sm90 in fresh processes (the repository on their path), ``workers`` of
    them side by side (default: one per CPU core, at most 4), each compiling every ``workers``-th
    launch: the failures."""
    root = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": root}
    workers = max(1, min(workers or os.cpu_count() or 1, 4, len(launches)))

    def compile_share(i: int) -> list[str]:
        out = subprocess.run([sys.executable, "-c", _COMPILE], input=json.dumps(launches[i::workers]),
                             capture_output=True, text=True, env=env, timeout=900)
        if out.returncode != 0:
            return [f"the compile process failed: {out.stderr[-3000:]}"]
        return json.loads(out.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(workers) as pool:
        return [f for share in pool.map(compile_share, range(workers)) for f in share]
