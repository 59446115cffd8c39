"""The harness's workloads besides the fan-outs (which live in :mod:`benchmarks.fanout`)."""
