"""What the dashboard shows, read through the bus's public API (``Bus`` views and the CFN Loop).

Two snapshots, each a JSON-ready dict: :func:`overview` (every swarm at a glance) and
:meth:`SwarmWatch.read` (one swarm's blocking view). The dashboard never writes while it reads:
it uses no consumer group, so watching a swarm leaves no trace in Redis. The timeline and the
latency histograms come from the ``events`` and ``acks`` streams, read incrementally by entry
id (``XRANGE`` from the last id seen), starting ``window`` seconds back in server time.
"""

from __future__ import annotations

import bisect
import contextlib
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from streambus.bus import Bus
from streambus.cfn.loop import LOOP_OF, EpicLoop, PhaseState
from streambus.errors import InvalidInput, MalformedEvent, UnknownEvent
from streambus.schema import (
    FIELD,
    Ack,
    AnyEvent,
    BlockingEnded,
    BlockingStarted,
    BlockingState,
    RetryRequest,
    decode_fields,
    stream_id_ms,
)

LATENCY_BOUNDS_MS: Final = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
"""Upper bounds of the latency histogram's buckets (ms); one more bucket holds the rest."""
MAX_SWARMS: Final = 500
MAX_SPANS: Final = 400
MAX_SAMPLES: Final = 20_000
DEAD_LETTERS_SHOWN: Final = 50
_BATCH: Final = 1000
_BATCHES_PER_READ: Final = 5
"""A read catches up on at most this many batches of a stream; the rest comes next time."""


@dataclass(frozen=True, slots=True)
class DashboardOptions:
    """How the dashboard reads and what it allows."""

    dead_after: float = 120.0
    """A coordinator whose last heartbeat is older than this (server time) is shown dead."""
    allow_actions: bool = False
    """Allow actions that write (replaying a dead letter)."""
    interval: float = 0.5
    """How often each live feed reads the bus (seconds)."""
    window: float = 600.0
    """How far back the timeline and the latency histograms reach (seconds)."""


async def loop_state(bus: Bus, swarm: str) -> dict[str, Any] | None:
    """The swarm's CFN Loop (its epic's phases), or ``None`` when it runs none."""
    try:
        epic = await EpicLoop(bus, swarm).state()
    except InvalidInput:  # no epic started on this swarm
        return None
    current = epic.current
    return {
        "current": current.phase if current else None,
        "phases": [{"phase": p.phase, "state": str(p.state), "loop": p.loop,
                    "iteration": p.iteration, "round": p.round} for p in epic.phases],
    }


LOOP_STATES: Final = [str(s) for s in PhaseState]
LOOP_NUMBERS: Final = {str(state): loop for state, loop in LOOP_OF.items()}


async def overview(bus: Bus, options: DashboardOptions) -> dict[str, Any]:
    """Every swarm of the namespace: coordinators counted by state, dead letters, the oldest
    wait, and the CFN Loop state where the swarm has one."""
    now_ms = await bus.server_time_ms()
    ids = await bus.swarm_ids()
    swarms = []
    for swarm in ids[:MAX_SWARMS]:
        summary = await bus.summary(swarm, dead_after=options.dead_after)
        swarms.append({**msgspec.structs.asdict(summary),
                       "loop": await loop_state(bus, swarm)})
    return {"namespace": bus.namespace, "now_ms": now_ms, "dead_after": options.dead_after,
            "swarms": swarms, "more": max(0, len(ids) - MAX_SWARMS)}


async def swarm_exists(bus: Bus, swarm: str) -> bool:
    """Whether ``swarm`` has a coordinator (waiting or heartbeating), a channel or a loop."""
    return (bool(await bus.status(swarm)) or await loop_state(bus, swarm) is not None
            or swarm in await bus.swarm_ids())


class SwarmWatch:
    """One swarm's live view; keeps the timeline and latencies between reads."""

    def __init__(self, bus: Bus, swarm: str, options: DashboardOptions) -> None:
        self.bus = bus
        self.swarm = swarm
        self.keys = bus.keys(swarm)
        self.options = options
        self.window_ms = round(options.window * 1000)
        self._spans: OrderedDict[tuple[str, str, int], dict[str, Any]] = OrderedDict()
        self._samples: deque[tuple[int, str, int]] = deque(maxlen=MAX_SAMPLES)
        self._after: dict[str, str] = {}
        self._dead_count = -1
        self._dead_letters: list[dict[str, Any]] = []

    def __repr__(self) -> str:
        return (f"<SwarmWatch {self.swarm!r} spans={len(self._spans)} "
                f"samples={len(self._samples)}>")

    async def read(self) -> dict[str, Any]:
        """The swarm now: rows, loop, timeline, latency histograms and dead letters."""
        rows = await self.bus.status(self.swarm)
        counters = await self.bus.counters(self.swarm)
        now_ms = await self.bus.server_time_ms()
        await self._follow(self.keys.events, now_ms)
        await self._follow(self.keys.acks, now_ms)
        dead_count = counters.get("dead_letters", 0)
        if dead_count != self._dead_count:  # re-read only when the counter moved
            self._dead_letters = await self._read_dead_letters()
            self._dead_count = dead_count
        dead_after = self.options.dead_after
        return {
            "swarm": self.swarm, "now_ms": now_ms, "dead_after": dead_after,
            "window_ms": self.window_ms, "allow_actions": self.options.allow_actions,
            "rows": [{**row.as_dict(), "dead": row.last_heartbeat_age_s is not None
                      and row.last_heartbeat_age_s > dead_after} for row in rows],
            "counters": counters,
            "loop": await loop_state(self.bus, self.swarm),
            "spans": self._timeline(rows, now_ms),
            "latency": self._latency(now_ms),
            "dead_letters": self._dead_letters,
        }

    async def _follow(self, stream: str, now_ms: int) -> None:
        """Apply the stream's entries since the last read (at first, the last ``window``)."""
        start = (f"({self._after[stream]}" if stream in self._after
                 else f"{max(0, now_ms - self.window_ms)}-0")
        for _ in range(_BATCHES_PER_READ):
            entries = await self.bus.read_entries(stream, start, count=_BATCH)
            for entry_id, fields in entries:
                with contextlib.suppress(MalformedEvent, UnknownEvent):  # not ours to judge
                    self._apply(entry_id, decode_fields(fields))
            if entries:
                self._after[stream] = entries[-1][0]
                start = f"({entries[-1][0]}"
            if len(entries) < _BATCH:
                break
        self._after.setdefault(stream, f"{max(0, now_ms - self.window_ms)}-0")

    def _apply(self, entry_id: str, event: AnyEvent) -> None:
        if isinstance(event, BlockingStarted):
            key = (event.coordinator, event.channel, event.iteration)
            self._spans.setdefault(key, {
                "coordinator": event.coordinator, "channel": event.channel,
                "iteration": event.iteration, "start_ms": event.started_ms, "end_ms": None,
                "outcome": None})
            while len(self._spans) > MAX_SPANS:
                self._spans.popitem(last=False)
        elif isinstance(event, BlockingEnded):
            key = (event.coordinator, event.channel, event.iteration)
            span = self._spans.get(key)
            if span is None and event.started_ms:  # began before the window
                span = self._spans[key] = {
                    "coordinator": event.coordinator, "channel": event.channel,
                    "iteration": event.iteration, "start_ms": event.started_ms}
            if span is not None:
                span.update(end_ms=stream_id_ms(entry_id), outcome=str(event.outcome))
        elif isinstance(event, Ack):
            latency = max(0, stream_id_ms(entry_id) - stream_id_ms(event.stream_id))
            self._samples.append((stream_id_ms(entry_id), event.channel, latency))

    def _timeline(self, rows: list[Any], now_ms: int) -> list[dict[str, Any]]:
        """Recent waits, oldest first: the ones in the window, and every current wait."""
        horizon = now_ms - self.window_ms
        for key in [k for k, s in self._spans.items()
                    if s["end_ms"] is not None and s["end_ms"] < horizon]:
            del self._spans[key]
        spans = list(self._spans.values())
        for row in rows:  # a wait that began before the dashboard looked
            if row.state != BlockingState.WAITING or row.started_ms is None:
                continue
            key = (row.coordinator, row.channel or "", row.iteration or 0)
            if key not in self._spans:
                spans.append({"coordinator": row.coordinator, "channel": row.channel,
                              "iteration": row.iteration, "start_ms": row.started_ms,
                              "end_ms": None, "outcome": None})
        return sorted(spans, key=lambda s: s["start_ms"])

    def _latency(self, now_ms: int) -> list[dict[str, Any]]:
        """Signal publish -> ACK latency per channel over the window (server time)."""
        horizon = now_ms - self.window_ms
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()
        by_channel: dict[str, list[int]] = {}
        for _, channel, latency in self._samples:
            by_channel.setdefault(channel, []).append(latency)
        out = []
        for channel, values in sorted(by_channel.items()):
            counts = [0] * (len(LATENCY_BOUNDS_MS) + 1)
            for value in values:
                counts[bisect.bisect_left(LATENCY_BOUNDS_MS, value)] += 1
            ordered = sorted(values)
            out.append({"channel": channel, "count": len(values), "buckets": counts,
                        "p50_ms": _quantile(ordered, 0.5), "p99_ms": _quantile(ordered, 0.99),
                        "max_ms": ordered[-1]})
        return out

    async def _read_dead_letters(self) -> list[dict[str, Any]]:
        entries = await self.bus.latest_entries(self.keys.dead_letters, DEAD_LETTERS_SHOWN)
        return [dead_letter(self.keys.prefix, entry) for entry in entries]


def dead_letter(prefix: str, entry: tuple[str, dict[bytes, bytes] | None]) -> dict[str, Any]:
    """One dead letter for display: when, why, from where, and what it was."""
    entry_id, fields = entry[0], entry[1] or {}
    text = {k.decode(errors="replace"): v.decode(errors="replace")
            for k, v in fields.items() if not k.startswith(b"orig.")}
    original = {k[len(b"orig."):]: v for k, v in fields.items() if k.startswith(b"orig.")}
    kind, replayable = "undecodable", False
    try:
        event = decode_fields(original)
        kind, replayable = type(event).__name__, isinstance(event, RetryRequest)
    except UnknownEvent as exc:
        kind = f"unknown type {exc.event_type!r}"
    except MalformedEvent:
        pass
    source = text.get("source", "")
    return {
        "id": entry_id, "at_ms": stream_id_ms(entry_id), "reason": text.get("reason", ""),
        "source": source[len(prefix) + 1:] if source.startswith(prefix + ":") else source,
        "source_id": text.get("source_id", ""), "group": text.get("group", ""),
        "kind": kind, "replayable": replayable,
        "body": original.get(FIELD, b"").decode(errors="replace")[:500],
    }


def _quantile(ordered: list[int], q: float) -> int:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
