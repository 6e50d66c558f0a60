"""The benchmark harness: `make bench` (never part of the test suite or CI).

Each figure is measured against a baseline taken in the same run, on the same machine,
as medians and p99 over repeated trials; see docs/benchmarks.md for the latest table.
"""
