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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    name = missing_optional(call.excinfo.value) if report.failed and call.excinfo is not None else None
    if name is not None:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {skip_reason(name)}")
