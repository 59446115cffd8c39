"""Imported first by the CLI, before anything imports the Redis client.

redis-py (8.x) imports the OpenTelemetry metrics API and SDK as it is imported, only so that
an application can turn on redis-py's own OpenTelemetry metrics. The CLI never does, and those
imports are about 45 ms of the ~240 ms that importing redis takes (a one-shot ``streambus
signal`` is mostly imports; see docs/performance.md). So the CLI imports redis with them
hidden: redis-py then notes that its metrics are unavailable in this process, and nothing else
changes (both stay importable by anything else afterwards; tracing does not use them).

A library user's process is left alone: ``import streambus`` does not run this.
"""

from __future__ import annotations

import sys
from typing import Final

_HIDDEN: Final = ("opentelemetry.metrics", "opentelemetry.sdk.metrics")


def import_redis_without_its_metrics() -> None:
    """Import redis-py with OpenTelemetry's metrics hidden (once, if nothing has yet)."""
    if "redis" in sys.modules or any(name in sys.modules for name in _HIDDEN):
        return
    for name in _HIDDEN:
        sys.modules[name] = None  # type: ignore[assignment]  # importing it raises ImportError
    try:
        import redis  # noqa: F401
    finally:
        for name in _HIDDEN:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


import_redis_without_its_metrics()
