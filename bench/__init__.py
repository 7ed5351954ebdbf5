<<<<<<< HEAD
"""Esplanade benchmarks: `make bench` runs them all and writes bench/results/latest.{json,md}."""
=======
"""Benchmarks: `python -m bench.throughput` (see its docstring). Results are JSON records."""
>>>>>>> datapath
