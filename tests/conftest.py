"""Shared test setup: one thread (the CI machine has 2 cores), deterministic seeds, GPU marker,
and clean skips where an optional package is missing."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402 (importing torch and asking for CUDA does not import triton)

# Without CUDA, the Triton kernels' tests run in Triton's interpreter. The mode is fixed at the
# first `import triton` of the process, so it is decided here, before anything imports it; with
# CUDA the kernels compile, and the interpreter tests run in a fresh process (test_fresh_process).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)

from .optional import missing_optional, skip_reason  # noqa: E402


def _interpreter_problem() -> str | None:
    """Why this Triton's interpreter cannot run the kernels here, or None. Triton 3.6's (torch 2.11's)
    fails under NumPy 2.4 on any loop whose bound is computed in the kernel ("only 0-dimensional
    arrays can be converted to Python scalars"); probed once with such a loop."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import numpy
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def _loop(out, n):
        acc = 0
        for _ in range(tl.program_id(0) + n):
            acc += 1
        tl.store(out, acc)

    try:
        _loop[(1,)](torch.zeros(1, dtype=torch.int32), 2)
    except Exception as err:  # noqa: BLE001 - reported in the header
        return (f"Triton {triton.__version__}'s interpreter fails here with NumPy {numpy.__version__} "
                f"({str(err).splitlines()[-1][:100]}): the kernel tests with loops fail for that reason; install "
                "numpy<2.4 or a newer triton (.ci/compat pins it)")
    return None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """A run whose kernel tests failed says why when the interpreter itself is the cause."""
    problem = _interpreter_problem() if exitstatus != 0 else None
    if problem is not None:
        terminalreporter.section("Triton interpreter", yellow=True)
        terminalreporter.write_line(problem)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _value_checks_restored():
    """nl_layers' value checks are a process-wide switch: whatever a test sets, the next one starts
    from the setting it found (a leak once turned off the NaN checks of every later test)."""
    import nl_layers

    before = nl_layers.value_checks_enabled()
    yield
    nl_layers.set_value_checks(before)


@pytest.fixture(autouse=True)
def _tf32_restored():
    """The benchmarks' entry points turn TF32 on for their process (as the LM runs do); called from a
    test they would leave it on for every later one, whose float32 matmuls (deep momentum's inner sums
    on its torch path, say) then carry TF32's 10-bit rounding (after such tests an H100 run found
    that path 1.9e-4 from the kernels, against 1e-4 allowed; on the CPU it is 4.5e-7 from float64).
    Each test starts from the setting it found. Read and written through the flags the
    benchmarks use (torch refuses to mix them with ``fp32_precision``)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    yield
    if (matmul.allow_tf32, cudnn.allow_tf32) != before:
        matmul.allow_tf32, cudnn.allow_tf32 = before


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    name = missing_optional(call.excinfo.value) if report.failed and call.excinfo is not None else None
    if name is not None:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {skip_reason(name)}")
