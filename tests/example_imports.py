"""Docstring examples that import an optional package which is not installed skip their module."""

import ast
import doctest
import importlib.util

import pytest


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
