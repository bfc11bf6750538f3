"""Every Triton kernel the language models launch compiles for an sm90 GPU, checked on a CPU.

Triton's interpreter (which runs the kernels' CPU tests) does not type-check what the compiler
does: a runtime ``if`` whose two sides assign one name with different shapes runs in the
interpreter and fails to compile. Here one training step of each LM runs with every layer kernel
forced (the interpreter on a CPU), each launch's signature is recorded (pointer dtypes, integer
and float arguments, constexpr values), and a fresh process without the interpreter compiles each
distinct one with Triton's own compiler for an sm90 target, down to a cubin (no GPU needed)."""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="records launches through Triton's interpreter (a CPU run)")

triton = pytest.importorskip("triton")

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


def _record(monkeypatch, run) -> list[dict]:
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
                consts[name] = {"dtype": str(v)} if isinstance(v, triton.language.dtype) else v
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


def _force_kernels(monkeypatch):
    from nl_layers.ops import causal_conv, normalize_kernels
    from nl_layers.ops.fast_weights import decay_kernels, factor_kernels, read_kernels, shared_read_kernels

    monkeypatch.setattr(causal_conv, "_kernel_ok", lambda *a, **k: True)
    for module in (normalize_kernels, factor_kernels, shared_read_kernels, read_kernels, decay_kernels):
        monkeypatch.setattr(module, "kernel_ok", lambda *a, **k: True)


def test_every_lm_kernel_compiles_for_sm90(monkeypatch):
    import nl_layers

    _force_kernels(monkeypatch)

    def steps():
        for cls in (nl_layers.TitansLM, nl_layers.HopeLM):
            for dtype in (torch.float32, torch.bfloat16):
                torch.manual_seed(0)
                lm = cls(vocab_size=11, dim=16, depth=1, heads=2).to(dtype)
                lm.loss(torch.randint(0, 11, (2, 13))).backward()

    launches = _record(monkeypatch, steps)
    names = {k["name"] for k in launches}
    assert {"_silu_kernel", "_silu_backward_kernel", "_normalize_kernel", "_read_grads_kernel"} <= names, names
    root = str(Path(__file__).resolve().parents[2])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", _COMPILE], input=json.dumps(launches), capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    failed = json.loads(out.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(failed)
