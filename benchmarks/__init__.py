"""The benchmark harness (issue 6): ``python -m benchmarks --preset ci|small|full --out DIR``.

Layout: ``__main__`` runs the plan of a preset (``presets``) in one session (``session``: the
server, a bus, an admin client) and writes the report (``report``, ``plots``). ``fanout`` drives
the fan-out latency workloads through worker processes (``worker``, ``children``) hosting the
waiters of each system (``systems``: streambus and the baselines). ``workloads/`` holds the rest:
the signal-before-waiter race, retry throughput, heartbeat CPU, Redis memory and cleanup.
``common`` has the clock, HDR summaries, machine facts and the throwaway server.
"""
