"""The store: the only module that talks to Redis.

Everything above this module speaks streambus's language (events, ids, outcomes); everything
below it is redis-py. Redis errors are translated into :mod:`streambus.errors` here and nowhere
else. redis-py's own command retries are switched off: a retried ``XADD`` can append twice and a
retried blocking read can strand entries in the PEL (see ``docs/failure-behaviour.md``), so
retrying is decided above the store, where it is known to be safe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

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
from streambus.store._errors import GroupMissing, translated
from streambus.store.reader import BlockingReader
from streambus.store.signals import SignalOps
from streambus.store.upkeep import UpkeepOps

__all__ = [
    "BlockingReader",
    "Durability",
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
]


class Store(SignalOps, UpkeepOps):
    """A connection to one Redis server, and the handful of operations streambus needs."""

    def __init__(self, url: str, *, limits: Limits, max_connections: int = 32) -> None:
        self.url = url
        self.limits = limits
        self._pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=None,
            socket_timeout=5.0,
            socket_connect_timeout=2.0,
            retry=Retry(NoBackoff(), 0),
        )
        # redis-py's reply types are unions too wide to be useful; replies are converted to
        # our own types right here, so the client is typed as Any on purpose.
        self._redis: Any = aioredis.Redis.from_pool(self._pool)
        self._scripts = _Scripts(self._redis)
        self._closed = False

    def __repr__(self) -> str:
        return f"<Store {self.url_redacted!r}{' closed' if self._closed else ''}>"

    @property
    def url_redacted(self) -> str:
        """The URL with any password replaced, fit for logs and errors."""
        scheme, sep, rest = self.url.partition("://")
        userinfo, at, hostpart = rest.rpartition("@")
        if not at:
            return self.url
        user = userinfo.partition(":")[0]
        return f"{scheme}{sep}{user}:***@{hostpart}"

    async def aclose(self) -> None:
        """Close every connection. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        # The client owns its pool (``from_pool``): closing the client closes the pool, once.
        with contextlib.suppress(Exception):
            await self._redis.aclose()

    def blocking_reader(self, *, block_ms: int) -> BlockingReader:
        """A reader with a connection of its own, for ``XREAD BLOCK``."""
        return BlockingReader(self.url, block_ms=block_ms)


    async def ping(self) -> None:
        with translated():
            await self._redis.ping()

    async def run_script(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run an application's script on keys of one slot; errors translated."""
        with translated():
            return await self._scripts.call(script, keys=keys, args=args)

    async def unblock(self, client_id: int) -> bool:
        """Interrupt a client blocked in ``XREAD`` (it returns as if timed out)."""
        with translated():
            return bool(await self._redis.client_unblock(client_id))

    async def hgetall(self, key: str) -> dict[str, str]:
        with translated():
            raw = await self._redis.hgetall(key)
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def read_range(self, stream: str, start: str = "-", count: int = 1000) -> list[Entry]:
        with translated():
            raw = await self._redis.xrange(stream, min=start, count=count)
        return _decode_entries(raw)
