"""The blocking reader: one dedicated connection per blocking read loop."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

from streambus.errors import BusUnavailable
from streambus.store._base import Entry, Receipt, _decode_entries
from streambus.store._errors import translated
from streambus.store._nodes import Nodes


class BlockingReader:
    """One dedicated connection for ``XREAD BLOCK``, interruptible with ``CLIENT UNBLOCK``.

    ``BLOCK`` stays well below the socket timeout: otherwise the client would time out first
    and drop a connection the server may still deliver on.

    The connection goes to the master of ``route`` (a key of the swarm it reads). After any
    failure it is dropped, and the next read finds that master again (Sentinel: ask the
    sentinels; Cluster: the slot map), so a reader never stays on a demoted master.
    """

    def __init__(self, nodes: Nodes, route: str, *, block_ms: int,
                 receive: Callable[[Any, Sequence[Receipt]],
                                   Awaitable[list[str | BaseException]]] | None = None) -> None:
        self.block_ms = block_ms
        self.route = route
        self._nodes = nodes
        self._receive = receive
        self._redis: Any = None
        self._address: tuple[str, int] | None = None
        self.client_id: int | None = None

    def __repr__(self) -> str:
        return f"<BlockingReader route={self.route!r} client_id={self.client_id}>"

    @contextlib.asynccontextmanager
    async def _client(self) -> AsyncIterator[Any]:
        try:
            with translated(self._nodes.endpoint.username):
                await self._nodes.fresh()
                if self._redis is not None and self._nodes.address(self.route) != self._address:
                    # The topology moved the master (a Sentinel recheck) while this connection
                    # stayed up: a demoted master may never answer it with an error.
                    raise BusUnavailable(f"the master of {self.route} moved")
                if self._redis is None:
                    self._address = self._nodes.address(self.route)
                    self._redis = self._nodes.open_reader(
                        self.route, socket_timeout=self.block_ms / 1000 + 1.0)
                yield self._redis
        except BusUnavailable:
            self._nodes.stale()
            await self._drop()
            raise

    async def _drop(self) -> None:
        redis, self._redis, self.client_id = self._redis, None, None
        if redis is not None:
            with contextlib.suppress(Exception):
                await redis.aclose()

    async def connect(self) -> int:
        """(Re)connect and learn this connection's client id, for ``CLIENT UNBLOCK``."""
        async with self._client() as redis:
            self.client_id = int(await redis.client_id())
        return self.client_id

    async def read(self, cursors: Mapping[str, str]) -> dict[str, list[Entry]]:
        """Block until any stream has entries after its cursor, or the block time passes."""
        async with self._client() as redis:
            reply = await redis.xread(dict(cursors), block=self.block_ms)
        out: dict[str, list[Entry]] = {}
        for stream, entries in reply or ():
            out[stream.decode()] = _decode_entries(entries)
        return out

    async def read_group(self, stream: str, group: str, consumer: str, *, pending: bool,
                         count: int) -> list[Entry]:
        """``XREADGROUP``: the consumer's pending entries, or new ones blocking up to BLOCK."""
        async with self._client() as redis:
            reply = await redis.xreadgroup(
                group, consumer, {stream: "0" if pending else ">"}, count=count,
                block=None if pending else self.block_ms)
        if not reply:
            return []
        return [(entry_id.decode(), fields) for entry_id, fields in reply[0][1]]

    async def read_groups(self, streams: Sequence[str], group: str, consumer: str, *,
                          pending: bool, count: int, block: bool) -> dict[str, list[Entry]]:
        """``XREADGROUP`` over several streams of one slot: pending entries or new ones."""
        if not streams:
            return {}
        async with self._client() as redis:
            reply = await redis.xreadgroup(
                group, consumer, dict.fromkeys(streams, "0" if pending else ">"),
                count=count, block=self.block_ms if block and not pending else None)
        return {name.decode(): [(i.decode(), f) for i, f in entries]
                for name, entries in reply or ()}

    async def receive(self, receipts: Sequence[Receipt]) -> list[str | BaseException]:
        """Record receipts (the store's ``receive_many``) on this connection, idle between two
        reads: a lone waiter's receipt needs no connection from the pool (about 40 µs of
        client CPU per wake, which a hundred processes on two cores feel in their tail)."""
        assert self._receive is not None, "a reader made by Store.blocking_reader receives"
        async with self._client() as redis:
            return await self._receive(redis, receipts)

    async def aclose(self) -> None:
        """Close the connection. Safe to call twice."""
        await self._drop()
