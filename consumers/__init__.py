"""Projector processes: each one runs one projection of the swarm's event streams.

The blocking view, the trace projector, the metrics exporter and the watchdog live here (see
the projector and liveness issues). They read the same streams the library writes
(``streambus.keys``), each through a consumer group of its own.
"""
