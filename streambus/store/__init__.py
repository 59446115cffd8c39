"""The store: the only module that talks to Redis.

Everything above this module speaks streambus's language (events, ids, outcomes); everything
below it is redis-py. Redis errors are translated into :mod:`streambus.errors` here and nowhere
else. redis-py's own command retries are switched off: a retried ``XADD`` can append twice and a
retried blocking read can strand entries in the PEL (see ``docs/failure-behaviour.md``), so
retrying is decided above the store, where it is known to be safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from streambus.store._base import (
    Durability,
    Entry,
    GroupInfo,
    GroupRead,
    Limits,
    Receipt,
    Script,
    StreamInfo,
    SwarmSnapshot,
    WaitStart,
    _decode_entries,
    _Scripts,
)
from streambus.store._errors import GroupMissing
from streambus.store._nodes import nodes_for
from streambus.store.reader import BlockingReader
from streambus.store.signals import SignalOps
from streambus.store.upkeep import UpkeepOps
from streambus.store.urls import Endpoint, parse_url

__all__ = [
    "BlockingReader",
    "Durability",
    "Endpoint",
    "Entry",
    "GroupInfo",
    "GroupMissing",
    "GroupRead",
    "Limits",
    "Receipt",
    "Script",
    "Store",
    "StreamInfo",
    "SwarmSnapshot",
    "WaitStart",
    "parse_url",
]


class Store(SignalOps, UpkeepOps):
    """The handful of operations streambus needs, on one server, a Sentinel set's master or
    a cluster's masters (see ``streambus/store/_nodes.py``)."""

    def __init__(self, url: str, *, limits: Limits, max_connections: int = 32) -> None:
        self.url = url
        self.endpoint = parse_url(url)
        self.limits = limits
        self._nodes = nodes_for(self.endpoint, max_connections=max_connections)
        self._scripts = _Scripts()
        self._waitaof: dict[int, bool] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"<Store {self.url_redacted!r}{' closed' if self._closed else ''}>"

    @property
    def url_redacted(self) -> str:
        """The URL with any password replaced, fit for logs and errors."""
        return self.endpoint.redacted

    @property
    def topology(self) -> str:
        """``single``, ``sentinel`` or ``cluster``."""
        return self.endpoint.kind

    async def aclose(self) -> None:
        """Close every connection. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await self._nodes.aclose()

    def blocking_reader(self, *, block_ms: int, route: str = "") -> BlockingReader:
        """A reader with a connection of its own, for blocking reads of the swarm of the key
        ``route``; it finds that swarm's master again on every reconnect."""
        return BlockingReader(self._nodes, route, block_ms=block_ms, receive=self.receive_on)

    def raw(self, route: str = "") -> Any:
        """The plain redis-py client of the master serving ``route``, untranslated: for
        tests and benchmarks that look at the server itself, never for the bus's work."""
        return self._nodes.client(route)

    async def ping(self) -> None:
        """Reach every master (resolving the topology first)."""
        for redis in await self._masters():
            async with self._guarded():
                await redis.ping()

    async def run_script(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run an application's script on keys of one slot; errors translated."""
        async with self._on(keys[0] if keys else "") as redis:
            return await self._scripts.call(redis, script, keys=keys, args=args)

    async def unblock(self, client_id: int, route: str = "") -> bool:
        """Interrupt a client blocked in ``XREAD`` on the master of ``route`` (it returns as
        if timed out)."""
        async with self._on(route) as redis:
            return bool(await redis.client_unblock(client_id))

    async def hgetall(self, key: str) -> dict[str, str]:
        async with self._on(key) as redis:
            raw = await redis.hgetall(key)
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def read_range(self, stream: str, start: str = "-", count: int = 1000) -> list[Entry]:
        async with self._on(stream) as redis:
            raw = await redis.xrange(stream, min=start, count=count)
        return _decode_entries(raw)

    async def read_latest(self, stream: str, count: int) -> list[Entry]:
        """The last ``count`` entries of ``stream``, newest first (``XREVRANGE``)."""
        async with self._on(stream) as redis:
            raw = await redis.xrevrange(stream, count=count)
        return _decode_entries(raw)
