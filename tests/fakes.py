"""A scripted fake of the narrow store interface the dispatcher depends on
(:class:`streambus.dispatch_store.DispatchStore`), for the races a real server cannot time.

It models just enough of Redis Streams to be honest about them: streams of entries, one
consumer group per waiter with its last-delivered id and its PEL, ``XREAD BLOCK`` that wakes
when a stream grows past a cursor, ``CLIENT UNBLOCK`` that only lands once the read reached
the "server". Faults are armed by the test (``lose_next_receipt_reply``, ``drop_group``,
``vanish``, ``slow_to_block``) and fire once, at the exact step they name.

The real-server tests stay the authority; this fake only makes interleavings repeatable.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import anyio

from streambus.errors import BusUnavailable
from streambus.keys import SwarmKeys
from streambus.schema import FIELD, Signal, encode
from streambus.store import Entry, GroupMissing, GroupRead, Receipt


@dataclass
class _Group:
    last: int = 0
    """Entries delivered so far (index into the stream)."""
    pending: list[str] = field(default_factory=list)


class FakeStreams:
    """The fake server: streams, groups, and the faults armed against them."""

    def __init__(self) -> None:
        self.streams: dict[str, list[Entry]] = {}
        self.groups: dict[tuple[str, str], _Group] = {}
        self.acks: dict[tuple[str, str], str] = {}
        """(stream id, coordinator) -> ack id: the receive script's effect."""
        self.grew = anyio.Event()
        self.down = False
        # Faults, each firing once.
        self.lose_next_receipt_reply = False
        self.down_with_lost_reply = False
        """With ``lose_next_receipt_reply``: the server goes down as the reply is lost (a
        crash), so the receipt stays unconfirmed until the test brings it back."""
        self.drop_group: str | None = None
        """Delete this coordinator's group just before the next batch of group reads."""
        self.vanish_after_probe = False
        self.slow_to_block = 0
        """Unblock attempts that find the read not yet blocked on the server."""
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.down:
            raise BusUnavailable("fake: Redis unreachable")

    def publish(self, stream: str, signal: Signal) -> str:
        entries = self.streams.setdefault(stream, [])
        entry_id = f"{len(entries) + 1}-0"
        entries.append((entry_id, {FIELD: encode(signal)}))
        self.grew.set()
        self.grew = anyio.Event()
        return entry_id

    def _read(self, stream: str, group: str, pending: bool) -> list[Entry]:
        state = self.groups.get((stream, group))
        if state is None:
            raise GroupMissing(f"NOGROUP no group {group} for {stream}")
        entries = self.streams.get(stream, [])
        if pending and state.pending:  # else a new entry, as the deliver script reads
            by_id = dict(entries)
            return [(i, by_id.get(i)) for i in state.pending[:1]]
        if state.last >= len(entries):
            return []
        entry = entries[state.last]
        state.last += 1
        state.pending.append(entry[0])
        return [entry]


class FakeReader:
    """The blocking connection (:class:`streambus.dispatch_store.Reader`)."""

    def __init__(self, server: FakeStreams, block_ms: int,
                 receive: Callable[[Sequence[Receipt]], Awaitable[list[str | BaseException]]]
                 ) -> None:
        self.server = server
        self.block_s = block_ms / 1000
        self.receive = receive
        """The store's ``receive_many``: the fake has one connection for everything."""
        self.client_id: int | None = None
        self._blocked_on_server = False
        self._unblocked = anyio.Event()

    async def connect(self) -> int:
        self.server._count("connect")
        self.client_id = 1
        return 1

    async def _blocked(self) -> bool:
        """Block on the "server" until a stream grows (True) or an unblock lands (False)."""
        self._unblocked = anyio.Event()
        self._blocked_on_server = True
        try:
            grew = self.server.grew
            async with anyio.create_task_group() as tg:
                async def on_unblock() -> None:
                    await self._unblocked.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(on_unblock)
                await grew.wait()
                tg.cancel_scope.cancel()
            return not self._unblocked.is_set()
        finally:
            self._blocked_on_server = False

    async def read(self, cursors: Mapping[str, str]) -> dict[str, list[Entry]]:
        self.server._count("xread")
        with anyio.move_on_after(self.block_s):
            while not (grown := self._newer(cursors)):
                if not await self._blocked():
                    return {}
            return grown
        return {}

    def _newer(self, cursors: Mapping[str, str]) -> dict[str, list[Entry]]:
        out = {}
        for stream, cursor in cursors.items():
            after = int(cursor.partition("-")[0])
            entries = [e for e in self.server.streams.get(stream, [])
                       if int(e[0].partition("-")[0]) > after]
            if entries:
                out[stream] = entries
        return out

    async def read_group(self, stream: str, group: str, consumer: str, *, pending: bool,
                         count: int) -> list[Entry]:
        self.server._count("xreadgroup")
        with anyio.move_on_after(self.block_s):
            while not (entries := self.server._read(stream, group, pending)) and not pending:
                if not await self._blocked():
                    return []
            return entries
        return []

    def unblock(self) -> bool:
        if not self._blocked_on_server:
            return False
        self._unblocked.set()
        return True

    async def aclose(self) -> None:
        self.client_id = None


class FakeStore:
    """The store as the dispatcher sees it (:class:`streambus.dispatch_store.DispatchStore`)."""

    def __init__(self, server: FakeStreams | None = None) -> None:
        self.server = server or FakeStreams()
        self.readers: list[FakeReader] = []
        self.dead_letters: list[tuple[str, str]] = []

    def blocking_reader(self, *, block_ms: int, route: str = "") -> FakeReader:
        reader = FakeReader(self.server, block_ms, self.receive_many)
        self.readers.append(reader)
        return reader

    async def read_groups(self, reads: Sequence[GroupRead], probes: Sequence[str] = ()
                          ) -> tuple[list[str], list[list[Entry] | BaseException]]:
        server = self.server
        server._count("read_groups")
        last_ids = [(entries[-1][0] if (entries := server.streams.get(s)) else "0-0")
                    for s in probes]
        if server.vanish_after_probe:
            server.vanish_after_probe = False
            server.down = True  # the probe's reply came; the reads never ran
            raise BusUnavailable("fake: connection lost after the probe")
        if server.drop_group is not None:
            for key in [k for k in server.groups if k[1] == server.drop_group]:
                del server.groups[key]
            server.drop_group = None
        replies: list[list[Entry] | BaseException] = []
        for read in reads:
            try:
                replies.append(server._read(read.stream, read.group, read.pending))
            except GroupMissing as exc:
                replies.append(exc)
        return last_ids, replies

    async def receive_many(self, receipts: Sequence[Receipt]) -> list[str | BaseException]:
        server = self.server
        server._count("receive_many")
        out: list[str | BaseException] = []
        for receipt in receipts:
            key = (receipt.stream_id, receipt.coordinator)
            if key not in server.acks:
                server.acks[key] = f"{1000 + len(server.acks)}-0"
            group = server.groups.get((receipt.keys.channel(receipt.channel),
                                       receipt.coordinator))
            if group is not None and receipt.stream_id in group.pending:
                group.pending.remove(receipt.stream_id)
            out.append(server.acks[key])
        if server.lose_next_receipt_reply:
            server.lose_next_receipt_reply = False
            server.down = server.down_with_lost_reply
            raise BusUnavailable("fake: the receipt was applied, its reply lost")
        return out

    async def ensure_group(self, stream: str, group: str) -> None:
        self.server._count("ensure_group")
        self.server.groups.setdefault((stream, group), _Group())

    async def dead_letter(self, keys: SwarmKeys, source: str, group: str, entry: Entry,
                          reason: str, *, ack: bool = True) -> None:
        self.dead_letters.append((entry[0], reason))
        state = self.server.groups.get((source, group))
        if ack and state is not None and entry[0] in state.pending:
            state.pending.remove(entry[0])

    async def skip_unknown(self, keys: SwarmKeys, source: str, group: str, entry_id: str, *,
                           ack: bool = True) -> None:
        await self.dead_letter(keys, source, group, (entry_id, None), "unknown", ack=ack)

    async def unblock(self, client_id: int, route: str = "") -> bool:
        self.server._count("unblock")
        if self.server.slow_to_block > 0:
            self.server.slow_to_block -= 1
            return False
        return any(reader.unblock() for reader in self.readers)


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Poll a state of the fake that offers no event to wait on, bounded by ``within``."""
    with anyio.fail_after(within):
        while True:
            if condition():
                return
            await anyio.sleep(0.001)
