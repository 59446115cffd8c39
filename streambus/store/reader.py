"""The blocking reader: one dedicated connection per blocking read loop."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from streambus.errors import BusUnavailable
from streambus.store._base import Entry, _decode_entries
from streambus.store._errors import translated


class BlockingReader:
    """One dedicated connection for ``XREAD BLOCK``, interruptible with ``CLIENT UNBLOCK``.

    ``BLOCK`` stays well below the socket timeout: otherwise the client would time out first
    and drop a connection the server may still deliver on.
    """

    def __init__(self, url: str, *, block_ms: int) -> None:
        self.block_ms = block_ms
        self._redis: Any = aioredis.Redis.from_url(
            url,
            single_connection_client=True,
            socket_timeout=block_ms / 1000 + 1.0,
            socket_connect_timeout=2.0,
            retry=Retry(NoBackoff(), 0),
        )
        self.client_id: int | None = None

    async def connect(self) -> int:
        """(Re)connect and learn this connection's client id, for ``CLIENT UNBLOCK``."""
        with translated():
            self.client_id = int(await self._redis.client_id())
        return self.client_id

    async def read(self, cursors: Mapping[str, str]) -> dict[str, list[Entry]]:
        """Block until any stream has entries after its cursor, or the block time passes."""
        try:
            with translated():
                reply = await self._redis.xread(dict(cursors), block=self.block_ms)
        except BusUnavailable:
            self.client_id = None
            raise
        out: dict[str, list[Entry]] = {}
        for stream, entries in reply or ():
            out[stream.decode()] = _decode_entries(entries)
        return out

    async def read_group(self, stream: str, group: str, consumer: str, *, pending: bool,
                         count: int) -> list[Entry]:
        """``XREADGROUP``: the consumer's pending entries, or new ones blocking up to BLOCK."""
        try:
            with translated():
                reply = await self._redis.xreadgroup(
                    group, consumer, {stream: "0" if pending else ">"}, count=count,
                    block=None if pending else self.block_ms)
        except BusUnavailable:
            self.client_id = None
            raise
        if not reply:
            return []
        return [(entry_id.decode(), fields) for entry_id, fields in reply[0][1]]

    async def read_groups(self, streams: Sequence[str], group: str, consumer: str, *,
                          pending: bool, count: int, block: bool) -> dict[str, list[Entry]]:
        """``XREADGROUP`` over several streams of one slot: pending entries or new ones."""
        if not streams:
            return {}
        try:
            with translated():
                reply = await self._redis.xreadgroup(
                    group, consumer, dict.fromkeys(streams, "0" if pending else ">"),
                    count=count, block=self.block_ms if block and not pending else None)
        except BusUnavailable:
            self.client_id = None
            raise
        return {name.decode(): [(i.decode(), f) for i, f in entries]
                for name, entries in reply or ()}

    async def aclose(self) -> None:
        """Close the connection. Safe to call twice."""
        with contextlib.suppress(Exception):
            await self._redis.aclose()
