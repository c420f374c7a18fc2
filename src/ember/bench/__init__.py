"""Benchmarks: `make bench-NAME` runs `python -m ember.bench.NAME`."""
