"""Benchmarks: `python -m bench.throughput` (see its docstring). Results are JSON records."""
