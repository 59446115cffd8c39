"""Liveness: heartbeats, and judging a watched peer dead, both in server time.

A coordinator beats from a task of its own, so a long wait or a slow handler never delays a
beat. A beat appends a ``Heartbeat`` to the swarm's heartbeat stream (trimmed by age) and sets
the coordinator's score in the ``alive`` index to the server's ``TIME``, in one script.

A peer is dead when its last beat is older than ``dead_after``, measured on the server clock,
for ``stale_checks`` checks in a row. Checks run every ``heartbeat_interval / stale_checks``, so
a dead peer is detected within ``dead_after + heartbeat_interval``. A check that cannot reach the
server counts for nothing and resets the streak, and after an outage a peer's age is measured
from the moment the server was reachable again (nobody could beat while it was down), so being
cut off never makes a live peer look dead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio
import anyio.abc

from streambus.errors import BusUnavailable, InvalidInput, PeerDead
from streambus.keys import SwarmKeys
from streambus.schema import Heartbeat, encode
from streambus.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Liveness:
    """How often a coordinator beats and when a silent peer counts as dead."""

    heartbeat_interval: float = 5.0
    dead_after: float = 120.0
    stale_checks: int = 3

    def __post_init__(self) -> None:
        if self.heartbeat_interval <= 0 or self.dead_after <= 0:
            raise InvalidInput("heartbeat interval and dead-after must be positive")
        if self.stale_checks < 1:
            raise InvalidInput("stale checks must be at least 1")

    @property
    def check_interval(self) -> float:
        return self.heartbeat_interval / self.stale_checks


class BeatBatcher:
    """Sends the heartbeats of every coordinator of a process in as few calls as possible.

    A thousand coordinators beating every 5 s from one process would cost a thousand script
    calls per interval, each ~100 us of client CPU, and a thousand timers and task wake-ups.
    Beats that fall due within ``window`` of each other go out as one call per swarm; the
    first caller of a window sends it, the others wait for its answer. After its first beat a
    :class:`Heartbeater` joins the *roster* of its interval: one of the roster's tasks (its
    leader) beats for all of them on the interval's grid, one call per swarm, while the others
    sleep until cancelled, or until the leader leaves and one of them is promoted.
    """

    def __init__(self, store: Store, *, window: float = 0.005) -> None:
        self.store = store
        self.window = window
        self._open: dict[SwarmKeys, _Batch] = {}
        self._rosters: dict[float, _Roster] = {}
        self.calls = 0

    def __repr__(self) -> str:
        members = sum(len(r.members) for r in self._rosters.values())
        return (f"<BeatBatcher window={self.window}s calls={self.calls} "
                f"rosters={len(self._rosters)} members={members}>")

    async def beat(self, keys: SwarmKeys, coordinator: str, event: bytes, failures: int) -> int:
        """Record one beat (batched); return its server time in ms."""
        batch = self._open.get(keys)
        if batch is not None:
            batch.beats.append((coordinator, event, failures))
            await batch.done.wait()
            return batch.result()
        batch = self._open[keys] = _Batch([(coordinator, event, failures)])
        try:
            try:
                await anyio.sleep(self.window)  # let the beats due with this one join it
            finally:
                if self._open.get(keys) is batch:
                    del self._open[keys]  # later beats start the next batch
            self.calls += 1
            batch.now_ms = await self.store.beat_many(keys, batch.beats)
        except BaseException as exc:
            batch.error = exc  # the beats that joined fail with it
            raise
        finally:
            batch.done.set()
        return batch.now_ms

    async def keep_beating(self, beater: Heartbeater) -> None:
        """Beat for ``beater`` every interval, with its roster, until cancelled."""
        roster = self._rosters.setdefault(beater.interval, _Roster())
        promoted = roster.members[beater] = anyio.Event()
        try:
            if roster.leader is None:
                roster.leader = beater
            while roster.leader is not beater:
                await promoted.wait()
            await self._lead(roster, beater.interval)
        finally:
            del roster.members[beater]
            if roster.leader is beater:
                roster.leader = next(iter(roster.members), None)
                if roster.leader is not None:
                    roster.members[roster.leader].set()
            if not roster.members and self._rosters.get(beater.interval) is roster:
                del self._rosters[beater.interval]

    async def _lead(self, roster: _Roster, interval: float) -> None:
        # The interval's grid, as each Heartbeater's own schedule would be: drift-free. A
        # leader that takes over keeps it, and first sends the beats of a tick its
        # predecessor left unfinished (cancelled while sending them).
        if roster.next_at is None:
            roster.next_at = (math.floor(anyio.current_time() / interval) + 1) * interval
        while True:
            await anyio.sleep(max(0.0, roster.next_at - anyio.current_time()))
            by_swarm: dict[SwarmKeys, list[Heartbeater]] = {}
            for member in roster.members:
                by_swarm.setdefault(member.keys, []).append(member)
            for keys, members in by_swarm.items():
                await self._beat_all(keys, members, interval)
            roster.next_at += interval

    async def _beat_all(self, keys: SwarmKeys, members: list[Heartbeater],
                        interval: float) -> None:
        beats = [(m.coordinator, m.event(), m.unreported) for m in members]
        try:
            with anyio.fail_after(max(interval, 1.0)):
                self.calls += 1
                now_ms = await self.store.beat_many(keys, beats)
        except (BusUnavailable, TimeoutError) as exc:
            for member in members:
                member.failed(exc)
            return
        for member in members:
            member.succeeded(now_ms)


@dataclass(eq=False)
class _Roster:
    members: dict[Heartbeater, anyio.Event] = field(default_factory=dict)
    """Each member's promotion: set when it is to lead."""
    leader: Heartbeater | None = None
    next_at: float | None = None
    """When the roster's next beats are due (``anyio.current_time()``)."""


@dataclass
class _Batch:
    beats: list[tuple[str, bytes, int]]
    done: anyio.Event = field(default_factory=anyio.Event)
    now_ms: int = 0
    error: BaseException | None = None

    def result(self) -> int:
        if self.error is not None:
            if isinstance(self.error, BusUnavailable):
                raise BusUnavailable(str(self.error))
            raise BusUnavailable(f"the batch carrying this beat failed: {self.error!r}")
        return self.now_ms


class Heartbeater:
    """Beats for one coordinator until cancelled. Failures are counted, never fatal."""

    def __init__(self, store: Store, keys: SwarmKeys, coordinator: str, interval: float, *,
                 batcher: BeatBatcher | None = None) -> None:
        self.store = store
        self.batcher = batcher
        self.keys = keys
        self.coordinator = coordinator
        self.interval = interval
        self.beats = 0
        self.failures = 0
        # Failures not yet added to the swarm's ``heartbeat_failures`` counter: the next
        # successful beat adds them (a failing beat cannot reach the counter).
        self.unreported = 0
        self.last_beat_ms: int | None = None

    def __repr__(self) -> str:
        return (f"<Heartbeater {self.coordinator!r} every {self.interval}s beats={self.beats} "
                f"failures={self.failures}>")

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Beat now, report ready, then beat every interval on a drift-free schedule."""
        await self.beat_once()
        task_status.started()
        if self.batcher is not None:
            # With the process's other coordinators of this interval (see BeatBatcher).
            await self.batcher.keep_beating(self)
            return
        # Later beats fall on a grid of the interval, as the batcher's rosters do.
        next_at = (math.floor(anyio.current_time() / self.interval) + 1) * self.interval
        while True:
            await anyio.sleep(max(0.0, next_at - anyio.current_time()))
            await self.beat_once()
            next_at += self.interval

    def event(self) -> bytes:
        """The next beat's encoded ``Heartbeat``."""
        return encode(Heartbeat(coordinator=self.coordinator, seq=self.beats,
                                interval_ms=round(self.interval * 1000)))

    async def beat_once(self) -> None:
        event = self.event()
        try:
            with anyio.fail_after(max(self.interval, 1.0)):
                if self.batcher is not None:
                    now_ms = await self.batcher.beat(self.keys, self.coordinator, event,
                                                     self.unreported)
                else:
                    now_ms = await self.store.beat(self.keys, self.coordinator, event,
                                                   failures=self.unreported)
        except (BusUnavailable, TimeoutError) as exc:
            self.failed(exc)
        else:
            self.succeeded(now_ms)

    def succeeded(self, now_ms: int) -> None:
        """A beat was recorded at ``now_ms`` (server time), with the failures it reported."""
        self.last_beat_ms = now_ms
        self.beats += 1
        self.unreported = 0

    def failed(self, exc: BaseException) -> None:
        """A beat failed: counted, and reported by the next one that succeeds."""
        self.failures += 1
        self.unreported += 1
        log.warning("heartbeat of %s failed (%d so far): %s", self.coordinator, self.failures,
                    exc)


class PeerWatch:
    """Watches peers' heartbeats; :meth:`run` returns only when one is judged dead."""

    def __init__(self, store: Store, keys: SwarmKeys, peers: Sequence[str], liveness: Liveness,
                 since_ms: int) -> None:
        self.store = store
        self.keys = keys
        self.peers = list(peers)
        self.liveness = liveness
        self._baseline_ms = since_ms
        self._streak = dict.fromkeys(self.peers, 0)

    def __repr__(self) -> str:
        return f"<PeerWatch {self.peers} dead_after={self.liveness.dead_after}s>"

    async def run(self) -> PeerDead:
        """Check until some peer is dead for ``stale_checks`` checks in a row; return why."""
        cut_off = False
        while True:
            try:
                now_ms, beats = await self.store.last_beats(self.keys, self.peers)
            except BusUnavailable:
                cut_off = True
                self._streak = dict.fromkeys(self.peers, 0)
            else:
                if cut_off:
                    # Fresh server time after an outage: nobody could beat while it lasted.
                    self._baseline_ms, cut_off = max(self._baseline_ms, now_ms), False
                if dead := self._judge(now_ms, beats):
                    return PeerDead(dead)
            await anyio.sleep(self.liveness.check_interval)

    def _judge(self, now_ms: int, beats: dict[str, int | None]) -> dict[str, float]:
        dead: dict[str, float] = {}
        for peer, beat_ms in beats.items():
            age_s = (now_ms - max(beat_ms or 0, self._baseline_ms)) / 1000
            stale = age_s > self.liveness.dead_after
            self._streak[peer] = self._streak[peer] + 1 if stale else 0
            if self._streak[peer] >= self.liveness.stale_checks:
                dead[peer] = (now_ms - beat_ms) / 1000 if beat_ms is not None else age_s
        return dead
