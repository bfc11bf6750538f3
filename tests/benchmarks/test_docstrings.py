"""Every docstring example in benchmarks/ runs and gives the output it shows."""

import doctest
import importlib

import pytest

from ..example_imports import run_examples

MODULES = ["benchmarks.cli", "benchmarks.continual", "benchmarks.continual_tasks", "benchmarks.environment",
           "benchmarks.metrics", "benchmarks.outdir", "benchmarks.optimizers", "benchmarks.plots",
           "benchmarks.quality", "benchmarks.report", "benchmarks.runner", "benchmarks.speed", "benchmarks.suites",
           "benchmarks.tasks", "benchmarks.tasks.base", "benchmarks.tasks.digits", "benchmarks.tasks.recall",
           "benchmarks.tasks.synthetic", "benchmarks.tasks.text", "benchmarks.pool", "benchmarks.data",
           "benchmarks.suite_runs", "benchmarks.smoke", "benchmarks.rebuild", "benchmarks.experiments",
           "benchmarks.experiments.run", "benchmarks.experiments.lm", "benchmarks.experiments.lm_optimizers",
           "benchmarks.experiments.lm_training", "benchmarks.experiments.recall", "benchmarks.experiments.continual_levels",
           "benchmarks.experiments.continual_levels_report", "benchmarks.continual_text_validation",
           "benchmarks.layers", "benchmarks.layers.timing", "benchmarks.layers.mixers", "benchmarks.layers.lm_steps",
           "benchmarks.layers.run", "benchmarks.layers.report", "benchmarks.layers.suite", "benchmarks.layers.lm_compile", "benchmarks.layers.lm_profile",
           "benchmarks.layers.causal_conv_bench", "benchmarks.layers.lm_value_checks", "benchmarks.layers.decay_mix_bench",
           "benchmarks.layers.lm_kernel_switch", "benchmarks.layers.lm_graphed", "benchmarks.layers.row_kernels_bench", "benchmarks.layers.matmul_layouts",
           "benchmarks.layers.long_context_bench", "benchmarks.layers.cms_in_context_bench", "benchmarks.lm_defaults",
           "benchmarks.lm_defaults.train", "benchmarks.lm_defaults.report", "benchmarks.lm_defaults.cli",
           "benchmarks.lr_transfer", "benchmarks.lr_transfer.tasks", "benchmarks.lr_transfer.sweep",
           "benchmarks.lr_transfer.report", "benchmarks.lr_transfer.cli", "benchmarks.nonfinite_check"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    failures, attempted = run_examples(module, optionflags=doctest.ELLIPSIS)
    assert attempted > 0, f"{name} has no docstring example"
    assert failures == 0, f"{name}: {failures} of {attempted} docstring examples failed"
