"""deepopt's benchmark suites: ``python -m benchmarks run --suite quick`` (see benchmarks/README.md)."""
