"""Latency benchmarks for streambus; run one with ``python -m benchmarks.<name>``."""
