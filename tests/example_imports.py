"""Docstring examples that import an optional package which is not installed skip their module."""

import ast
import doctest
import importlib.util

import pytest

from .optional import missing_optional, skip_reason


def missing_imports(module) -> set[str]:
    """Top-level packages imported by ``module``'s docstring examples that are not installed."""
    missing = set()
    for test in doctest.DocTestFinder().find(module):
        for example in test.examples:
            try:
                tree = ast.parse(example.source)
            except SyntaxError:
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                missing |= {n.split(".")[0] for n in names if importlib.util.find_spec(n.split(".")[0]) is None}
    return missing


def skip_if_examples_need_missing(module) -> None:
    """pytest.skip when ``module``'s docstring examples import a package that is not installed."""
    missing = missing_imports(module)
    if missing:
        pytest.skip(f"{module.__name__}'s examples need {', '.join(sorted(missing))}, which is not installed")


class _Runner(doctest.DocTestRunner):
    """A doctest runner that also keeps the unexpected exceptions."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.errors = []

    def report_unexpected_exception(self, out, test, example, exc_info):
        self.errors.append(exc_info[1])
        super().report_unexpected_exception(out, test, example, exc_info)


def run_examples(module, optionflags: int = 0, extraglobs: dict | None = None) -> doctest.TestResults:
    """doctest.testmod(module) that skips when an example needs a missing optional package."""
    skip_if_examples_need_missing(module)
    runner = _Runner(optionflags=optionflags)
    for test in doctest.DocTestFinder().find(module, module.__name__, extraglobs=extraglobs):
        runner.run(test)
    for err in runner.errors:
        name = missing_optional(err)
        if name is not None:
            pytest.skip(f"{module.__name__}'s examples: {skip_reason(name)}")
    return doctest.TestResults(runner.failures, runner.tries)
