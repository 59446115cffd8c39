"""What a dispatcher (:mod:`streambus.dispatch`) asks of the store and of its blocking
connection, as protocols: the real store serves them, and a scripted fake
(``tests/fakes.py``) plays the races a real server cannot time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from streambus.keys import SwarmKeys
from streambus.store import Entry, GroupRead, Receipt


class Reader(Protocol):
    """The blocking connection a dispatcher reads on (:class:`streambus.store.BlockingReader`)."""

    client_id: int | None

    async def connect(self) -> int: ...

    async def read(self, cursors: Mapping[str, str]) -> dict[str, list[Entry]]: ...

    async def read_group(self, stream: str, group: str, consumer: str, *, pending: bool,
                         count: int) -> list[Entry]: ...

    async def receive(self, receipts: Sequence[Receipt]) -> list[str | BaseException]: ...

    async def aclose(self) -> None: ...


class DispatchStore(Protocol):
    """Exactly what a dispatcher asks of the store (:class:`streambus.store.Store`), so that a
    scripted fake can play the races a real server cannot time (``tests/fakes.py``)."""

    def blocking_reader(self, *, block_ms: int, route: str = "") -> Reader: ...

    async def read_groups(self, reads: Sequence[GroupRead], probes: Sequence[str] = ()
                          ) -> tuple[list[str], list[list[Entry] | BaseException]]: ...

    async def receive_many(self, receipts: Sequence[Receipt]) -> list[str | BaseException]: ...

    async def ensure_group(self, stream: str, group: str) -> None: ...

    async def dead_letter(self, keys: SwarmKeys, source: str, group: str, entry: Entry,
                          reason: str, *, ack: bool = True) -> None: ...

    async def skip_unknown(self, keys: SwarmKeys, source: str, group: str, entry_id: str, *,
                           ack: bool = True) -> None: ...

    async def unblock(self, client_id: int, route: str = "") -> bool: ...
