"""``streambus dashboard``: a live web view of the bus, for operators.

Every swarm of a namespace at ``/``; one swarm's blocking view at ``/swarms/<swarm>`` (every
coordinator's state, deadline and heartbeat, the CFN Loop's phases, a timeline of recent waits,
the signal latency per channel, the dead letters). Pages update over server-sent events from
one shared poller per page (:mod:`~streambus.dashboard.feeds`), so the Redis cost does not grow
with the number of browsers. Read-only unless started with ``allow_actions``.

Needs the ``dashboard`` extra (Starlette, sse-starlette, uvicorn); every asset ships in
``static/`` (no CDN, no build step). Reads go through the bus's public API only
(:mod:`~streambus.dashboard.reads`).
"""

from streambus.dashboard.reads import DashboardOptions
from streambus.dashboard.server import DEFAULT_HOST, DEFAULT_PORT, serve

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "DashboardOptions", "serve"]
