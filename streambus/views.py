"""The read side of the bus: who is blocking on what, every swarm, and the raw streams.

:class:`Views` is what :class:`~streambus.Bus` offers readers (``streambus status``, the
metrics and trace projectors, the dashboard, applications such as the CFN Loop). Rows are
``msgspec.Struct``s; times are server time (``*_ms`` in ms, ``since``/``deadline`` in epoch
seconds), so a skewed reader clock changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import msgspec

from streambus.keys import (
    SWARM_INDEXES,
    SwarmKeys,
    swarm_channel_pattern,
    swarm_index_pattern,
    swarm_of_key,
)
from streambus.schema import BlockingState
from streambus.store import Entry, Store, StreamInfo, SwarmSnapshot

IDLE: Final = "idle"
"""The state shown for a coordinator that heartbeats but never waited."""

_OPTIONAL: Final = ("iteration", "started_ms", "deadline_ms", "updated_ms", "ended_ms",
                    "outcome", "last_signal", "last_stream_id", "remaining_s")
_INTS: Final = ("started_ms", "deadline_ms", "updated_ms", "ended_ms", "iteration")
_FROM_STATE: Final = frozenset(("coordinator", "state", "channel", "outcome", "last_signal",
                                "last_stream_id", *_INTS))
"""The fields of a blocking-state hash that a row shows as they are."""


class CoordinatorStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One row of the blocking view."""

    coordinator: str
    state: str
    """A :class:`~streambus.schema.BlockingState` value, or ``"idle"``."""
    channel: str | None = None
    iteration: int | None = None
    since: float | None = None
    """When the current wait began (waiting) or the last one ended (epoch seconds)."""
    deadline: float | None = None
    remaining_s: float | None = None
    """Seconds left until the deadline (waiting only)."""
    last_heartbeat_age_s: float | None = None
    retries_pending: int = 0
    watches: list[str] = []
    started_ms: int | None = None
    deadline_ms: int | None = None
    updated_ms: int | None = None
    ended_ms: int | None = None
    outcome: str | None = None
    last_signal: str | None = None
    last_stream_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of ``streambus status --json`` (fields a row lacks are left out)."""
        row = msgspec.structs.asdict(self)
        return {k: v for k, v in row.items() if v is not None or k not in _OPTIONAL}


class SwarmSummary(msgspec.Struct, frozen=True, kw_only=True):
    """One swarm at a glance: its coordinators counted by state."""

    swarm: str
    coordinators: int
    waiting: int
    signaled: int
    timed_out: int
    dead: int
    """Coordinators whose heartbeats lapsed past ``dead_after`` (server time)."""
    oldest_wait_s: float | None
    """How long the longest current wait has been blocking."""
    dead_letters: int


class Views:
    """Reads of one namespace. Mixed into :class:`~streambus.Bus`."""

    _store: Store
    namespace: str

    def keys(self, swarm: str) -> SwarmKeys:
        """Every key of ``swarm`` (ids validated)."""
        return SwarmKeys.for_swarm(self.namespace, swarm)

    async def server_time_ms(self) -> int:
        """The server's clock (``TIME``), in ms: the one clock streambus trusts."""
        return await self._store.time_ms()

    async def status(self, swarm: str) -> list[CoordinatorStatus]:
        """The blocking view of ``swarm``: every coordinator, its state, since when, on what,
        its deadline, how long since its last heartbeat, its retry backlog and whom it watches.

        Coordinators that only heartbeat (never waited) appear with state ``idle``.
        """
        snap = await self._store.swarm_snapshot(self.keys(swarm))
        # A hash without its coordinator or state is not a wait (a half-written or foreign
        # one): skipped, never a crash of the whole view.
        rows: dict[str, dict[str, str]] = {raw["coordinator"]: raw for raw in snap.states
                                           if raw.get("coordinator") and raw.get("state")}
        for coordinator in snap.beats.keys() - rows.keys():
            rows[coordinator] = {"coordinator": coordinator, "state": IDLE}
        return [_status_row(rows[c], snap.now_ms, snap.beats.get(c), snap.backlog.get(c, 0))
                for c in sorted(rows)]

    async def snapshot(self, swarm: str) -> SwarmSnapshot:
        """The raw material of :meth:`status`, read together: server now, every blocking-state
        hash, every last beat and the retry backlogs (two round trips)."""
        return await self._store.swarm_snapshot(self.keys(swarm))

    async def swarm_ids(self) -> list[str]:
        """Every swarm of the namespace that has a coordinator, a heartbeat or a channel
        (``SCAN`` of every master, for the swarms' indexes and their channel streams)."""
        indexes = await self._store.scan(swarm_index_pattern(self.namespace), type_="zset")
        found = [*(key for key in indexes if key.endswith(SWARM_INDEXES)),
                 *await self._store.scan(swarm_channel_pattern(self.namespace),
                                         type_="stream")]
        return sorted({s for key in found if (s := swarm_of_key(self.namespace, key))})

    async def swarms(self, *, dead_after: float = 120.0) -> list[SwarmSummary]:
        """Every swarm of the namespace, with its coordinators counted by state."""
        return [await self.summary(swarm, dead_after=dead_after)
                for swarm in await self.swarm_ids()]

    async def summary(self, swarm: str, *, dead_after: float = 120.0) -> SwarmSummary:
        """One swarm at a glance (see :class:`SwarmSummary`)."""
        rows = await self.status(swarm)
        counters = await self.counters(swarm)
        now_s = await self.server_time_ms() / 1000
        by_state = {state: sum(1 for r in rows if r.state == state) for state in BlockingState}
        waits = [now_s - r.since for r in rows
                 if r.state == BlockingState.WAITING and r.since is not None]
        dead = sum(1 for r in rows if r.last_heartbeat_age_s is not None
                   and r.last_heartbeat_age_s > dead_after)
        return SwarmSummary(
            swarm=swarm, coordinators=len(rows), waiting=by_state[BlockingState.WAITING],
            signaled=by_state[BlockingState.SIGNALED],
            timed_out=by_state[BlockingState.TIMED_OUT], dead=dead,
            oldest_wait_s=max(waits) if waits else None,
            dead_letters=counters.get("dead_letters", 0))

    async def counters(self, swarm: str) -> dict[str, int]:
        """The swarm's counters (``dead_letters``, ``heartbeat_failures``, ...)."""
        raw = await self._store.hgetall(self.keys(swarm).counters)
        return {name: int(value) for name, value in raw.items()}

    async def census(self, swarm: str) -> dict[tuple[str, str], int]:
        """Coordinators counted per ``(state, channel)``, on the server."""
        return await self._store.coordinator_census(self.keys(swarm))

    async def channels(self, swarm: str) -> list[str]:
        """Every channel of ``swarm`` that has a stream (found by ``SCAN``)."""
        keys = self.keys(swarm)
        head = keys.channel("x")[:-1]
        found = await self._store.scan(keys.channel_pattern, type_="stream")
        return sorted(key[len(head):] for key in found if key.startswith(head))

    async def stream_info(self, streams: Sequence[str]) -> dict[str, StreamInfo]:
        """Length and consumer groups of each stream, in one round trip."""
        return await self._store.stream_info(streams)

    async def read_entries(self, stream: str, start: str = "-", count: int = 1000
                           ) -> list[Entry]:
        """Entries of ``stream`` from ``start`` (inclusive; ``(id`` for exclusive)."""
        return await self._store.read_range(stream, start, count)

    async def latest_entries(self, stream: str, count: int = 100) -> list[Entry]:
        """The last ``count`` entries of ``stream``, newest first."""
        return await self._store.read_latest(stream, count)

    async def read_hash(self, key: str) -> dict[str, str]:
        return await self._store.hgetall(key)

    async def entry(self, stream: str, stream_id: str) -> Entry | None:
        """One entry by id, or ``None`` when it is gone (trimmed)."""
        return await self._store.entry(stream, stream_id)

    async def ack_id(self, swarm: str, signal_id: str, coordinator: str) -> str:
        """The id of ``coordinator``'s Ack of ``signal_id`` (``""`` when it has none)."""
        return await self._store.ack_id(self.keys(swarm), signal_id, coordinator)


def _status_row(raw: dict[str, str], now_ms: int, beat_ms: int | None, backlog: int
                ) -> CoordinatorStatus:
    row: dict[str, Any] = {k: v for k, v in raw.items() if k in _FROM_STATE}
    for name in _INTS:
        if name in row:
            row[name] = int(row[name])
    waiting = row.get("state") == BlockingState.WAITING
    since_ms = row.get("started_ms") if waiting else row.get("ended_ms", row.get("updated_ms"))
    deadline_ms = row.get("deadline_ms")
    return CoordinatorStatus(
        **row,
        since=since_ms / 1000 if since_ms is not None else None,
        deadline=deadline_ms / 1000 if deadline_ms is not None else None,
        remaining_s=(max(0.0, (deadline_ms - now_ms) / 1000)
                     if waiting and deadline_ms is not None else None),
        last_heartbeat_age_s=(now_ms - beat_ms) / 1000 if beat_ms is not None else None,
        retries_pending=backlog,
        watches=[p for p in raw.get("watches", "").split(",") if p],
    )
