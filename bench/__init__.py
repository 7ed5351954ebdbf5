"""Esplanade benchmarks: `make bench` runs them all and writes bench/results/latest.{json,md}."""
