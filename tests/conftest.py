"""Shared test setup: one thread (the CI machine has 2 cores), deterministic seeds, GPU marker."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Triton kernels run in Triton's interpreter on machines without CUDA; the mode is fixed at the
# first `import triton` of the process, so it is set here, before anything can import it.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

torch.set_num_threads(1)


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
