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
    calls per interval, each ~100 us of client CPU. Beats that fall due within ``window`` of
    each other (coordinators started together stay in step) go out as one call per swarm; the
    first caller of a window sends it, the others wait for its answer.
    """

    def __init__(self, store: Store, *, window: float = 0.005) -> None:
        self.store = store
        self.window = window
        self._open: dict[SwarmKeys, _Batch] = {}
        self.calls = 0

    def __repr__(self) -> str:
        return f"<BeatBatcher window={self.window}s calls={self.calls}>"

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
        # Later beats fall on a grid of the interval, so every coordinator of the process
        # with this interval beats at the same instants, and the batcher sends one call.
        next_at = (math.floor(anyio.current_time() / self.interval) + 1) * self.interval
        while True:
            await anyio.sleep(max(0.0, next_at - anyio.current_time()))
            await self.beat_once()
            next_at += self.interval

    async def beat_once(self) -> None:
        event = encode(Heartbeat(coordinator=self.coordinator, seq=self.beats,
                                 interval_ms=round(self.interval * 1000)))
        try:
            with anyio.fail_after(max(self.interval, 1.0)):
                if self.batcher is not None:
                    self.last_beat_ms = await self.batcher.beat(self.keys, self.coordinator,
                                                                event, self.unreported)
                else:
                    self.last_beat_ms = await self.store.beat(self.keys, self.coordinator,
                                                              event, failures=self.unreported)
            self.beats += 1
            self.unreported = 0
        except (BusUnavailable, TimeoutError) as exc:
            self.failures += 1
            self.unreported += 1
            log.warning("heartbeat of %s failed (%d so far): %s", self.coordinator,
                        self.failures, exc)


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
