"""Benchmarks: each `bench/bench_*.py` prints its figures and the ratio to its baseline."""
