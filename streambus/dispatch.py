"""The dispatcher: many waiting coordinators of one swarm share one blocking connection.

A naive waiter blocks in its own ``XREADGROUP`` on its own connection; a thousand of them in one
process cost a thousand connections and a thousand wake-ups per signal. Here each process runs
one dispatcher per swarm. It blocks in a single ``XREAD`` over every channel stream its waiters
watch (no group, so it moves nothing) and, when a stream grows, runs every interested waiter's
``XREADGROUP ... COUNT 1`` (non-blocking, through its own consumer group) in one pipeline, then
acknowledges every delivery in a second pipeline. Two round trips per signal, whatever the
number of waiters.

Correctness rests on three rules:

* A waiter's first read is of its own pending entries (``ID 0``): whatever was delivered to it
  before a crash or a lost reply is delivered again before anything new.
* A stream's cursor is the last id probed *before* its waiters' group reads ran, so an entry
  appended between the read and the ``XREAD`` is newer than the cursor and wakes the dispatcher.
* A waiter that gives up (timeout or cancellation) before its delivery is acknowledged leaves the
  entry in its PEL, and the next wait of that coordinator reads it first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Final

import anyio
import anyio.abc

from streambus.backoff import keep_running
from streambus.errors import BusUnavailable, MalformedEvent, StreambusError
from streambus.keys import SwarmKeys
from streambus.schema import (
    Signal,
    decode_fields,
    stream_id_tuple,
)
from streambus.store import BlockingReader, Entry, GroupMissing, GroupRead, Receipt, Store

log = logging.getLogger(__name__)

_KICK_ATTEMPTS: Final = 200


@dataclass(eq=False)
class Waiter:
    """One coordinator's open wait for one signal on one channel."""

    keys: SwarmKeys
    coordinator: str
    channel: str
    stream: str
    iteration: int
    reconnect_budget_s: float = 300.0
    pending_first: bool = True
    abandoned: bool = False
    signal: Signal | None = None
    unconfirmed: Receipt | None = None
    """A receipt sent whose reply never came: it may have been applied. Sent again (the
    receive script is idempotent) before anything new is read for this waiter."""
    stream_id: str = ""
    ack_id: str = ""
    error: BaseException | None = None
    settled: anyio.Event = field(default_factory=anyio.Event)
    in_flight: bool = False
    ended: bool = False
    failing: BaseException | None = None
    """An error (a dead peer) to end the wait with once the delivery in flight is over."""
    """The end of this wait was recorded (or attempted) by its coordinator."""
    started_ms: int = 0
    """When the wait began (server ms), carried by the lifecycle events it ends with."""

    def __repr__(self) -> str:
        state = "settled" if self.settled.is_set() else "waiting"
        return (
            f"<Waiter {self.coordinator!r} on {self.keys.swarm}/{self.channel} "
            f"iteration={self.iteration} {state}>"
        )


    def receipt(self, signal: Signal, stream_id: str) -> Receipt:
        """What the ``receive`` script records when this waiter takes ``signal``."""
        return Receipt(keys=self.keys, coordinator=self.coordinator, channel=self.channel,
                       stream_id=stream_id, signal_id=signal.signal_id,
                       iteration=self.iteration, started_ms=self.started_ms)


class Dispatcher:
    """Serves every waiter of one swarm in this process over one blocking connection."""

    def __init__(self, store: Store, keys: SwarmKeys, *, block_ms: int = 2000) -> None:
        self.store = store
        self.keys = keys
        self._reader: BlockingReader = store.blocking_reader(block_ms=block_ms)
        self._by_stream: dict[str, set[Waiter]] = {}
        self._cursors: dict[str, str] = {}
        self._unprobed: set[str] = set()
        self._dirty: set[Waiter] = set()
        self._work = anyio.Event()
        self._blocked = False
        self._kicking = False
        self._tg: anyio.abc.TaskGroup | None = None
        self.delivered = 0
        self.dead_lettered = 0

    def __repr__(self) -> str:
        waiting = sum(len(ws) for ws in self._by_stream.values())
        return (f"<Dispatcher swarm={self.keys.swarm!r} streams={len(self._by_stream)} "
                f"waiters={waiting}>")

    # -- called by waiters ---------------------------------------------------------------------

    def add(self, waiter: Waiter) -> None:
        """Start serving ``waiter``: its pending entries first, then new ones."""
        watchers = self._by_stream.setdefault(waiter.stream, set())
        if not watchers and waiter.stream not in self._cursors:
            self._unprobed.add(waiter.stream)
        watchers.add(waiter)
        self._dirty.add(waiter)
        self._wake()

    async def withdraw(self, waiter: Waiter, *, abandon: bool) -> None:
        """Stop serving ``waiter``. If its delivery is mid-flight, wait for it to settle.

        With ``abandon`` (cancellation) a delivery not yet acknowledged is left in the PEL for
        the coordinator's next wait; without it (a deadline) a racing delivery still counts.
        """
        waiter.abandoned = abandon
        self._forget(waiter)
        if waiter.in_flight:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await waiter.settled.wait()

    def fail(self, waiter: Waiter, error: BaseException) -> None:
        """End ``waiter`` with ``error``, unless a delivery settles it first: one mid-flight
        is let finish (a signal that arrived wins), and the error lands after it if not."""
        if waiter.settled.is_set():
            return
        if waiter.in_flight:
            waiter.failing = error
            return
        self._settle(waiter, error=error)

    def _landed(self, waiter: Waiter) -> None:
        """A delivery attempt for ``waiter`` is over: apply an error that waited for it."""
        waiter.in_flight = False
        if waiter.failing is not None and not waiter.settled.is_set():
            self._settle(waiter, error=waiter.failing)

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve waiters until cancelled. Connection loss is retried, never fatal."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            failing_since: float | None = None

            def unavailable(exc: Exception) -> None:
                nonlocal failing_since
                now = anyio.current_time()
                failing_since = failing_since if failing_since is not None else now
                assert isinstance(exc, BusUnavailable)
                self._after_disconnect(exc, now - failing_since)

            def recovered() -> None:
                nonlocal failing_since
                if failing_since is not None:
                    log.info("swarm %s: Redis reachable again after %.3f s", self.keys.swarm,
                             anyio.current_time() - failing_since,
                             extra={"event": "bus_reachable", "swarm": self.keys.swarm})
                failing_since = None

            await keep_running(self._cycle, on_unavailable=unavailable, on_recovered=recovered)

    async def _cycle(self) -> None:
        if self._dirty or self._unprobed:
            await self._serve_dirty()
            return
        if not self._by_stream:
            self._work = anyio.Event()
            await self._work.wait()
            return
        if self._reader.client_id is None:
            await self._reader.connect()
            return  # waiters may have arrived meanwhile: look again before blocking
        if (solo := self._solo()) is not None:
            await self._serve_solo(solo)
            return
        self._blocked = True
        try:
            grown = await self._reader.read(self._cursors_of_watched())
        finally:
            self._blocked = False
        for stream, entries in grown.items():
            if entries:
                self._cursors[stream] = entries[-1][0]
                self._dirty.update(self._by_stream.get(stream, ()))

    def _solo(self) -> Waiter | None:
        """The only waiter, when there is exactly one (the common case of one process each)."""
        if len(self._by_stream) != 1:
            return None
        [watchers] = self._by_stream.values()
        if len(watchers) != 1:
            return None
        [waiter] = watchers
        return waiter

    async def _serve_solo(self, waiter: Waiter) -> None:
        """One waiter: block in its own ``XREADGROUP`` (one round trip less than ``XREAD``).

        A delivery that arrives after the waiter gave up stays in its PEL, where the
        coordinator's next wait reads it first; the stream's cursor is dropped, so if other
        waiters join later the stream is probed afresh.
        """
        self._cursors.pop(waiter.stream, None)
        self._blocked = True
        try:
            entries = await self._reader.read_group(waiter.stream, waiter.coordinator,
                                                    waiter.coordinator, pending=False, count=1)
        except GroupMissing:
            await self.store.ensure_group(waiter.stream, waiter.coordinator)
            return
        finally:
            self._blocked = False
        if not entries or waiter.settled.is_set() or waiter not in self._by_stream.get(
                waiter.stream, ()):
            return
        waiter.in_flight = True
        try:
            receipt = await self._receipt_or_dead_letter(waiter, entries[0])
            if receipt is not None:
                await self._acknowledge([(waiter, receipt)])
        finally:
            self._landed(waiter)

    async def _serve_dirty(self) -> None:
        batch = [w for w in self._dirty if not w.settled.is_set()]
        self._dirty.clear()
        probes = sorted(self._unprobed)
        self._unprobed.clear()
        for waiter in batch:
            waiter.in_flight = True
        # A waiter whose receipt reply was lost must not read on: its entry may already be
        # acknowledged, so a fresh read would skip it. It confirms that receipt instead.
        receipts = [(w, w.unconfirmed) for w in batch if w.unconfirmed is not None]
        readers = [w for w in batch if w.unconfirmed is None]
        try:
            if readers or probes:
                last_ids, replies = await self.store.read_groups(
                    [GroupRead(w.stream, w.coordinator, w.pending_first) for w in readers],
                    probes)
                for stream, last_id in zip(probes, last_ids, strict=True):
                    self._cursors[stream] = _min_id(self._cursors.get(stream), last_id)
                receipts += await self._take_replies(readers, replies)
            await self._acknowledge(receipts)
        except BusUnavailable:
            self._dirty.update(w for w in batch if not w.settled.is_set())
            self._unprobed.update(probes)
            raise
        finally:
            for waiter in batch:
                self._landed(waiter)

    async def _take_replies(
        self, batch: list[Waiter], replies: list[list[Entry] | BaseException]
    ) -> list[tuple[Waiter, Receipt]]:
        receipts: list[tuple[Waiter, Receipt]] = []
        for waiter, reply in zip(batch, replies, strict=True):
            if isinstance(reply, GroupMissing):
                # The group vanished (a restart without persistence, or cleanup): recreate it
                # at the start of the stream and read again from the pending entries.
                await self.store.ensure_group(waiter.stream, waiter.coordinator)
                waiter.pending_first = True
                self._dirty.add(waiter)
            elif isinstance(reply, BaseException):
                if isinstance(reply, BusUnavailable):
                    raise reply
                self._settle(waiter, error=reply)
            elif not reply:
                if waiter.pending_first:
                    waiter.pending_first = False
                    self._dirty.add(waiter)
            elif waiter.abandoned:
                continue
            else:
                receipt = await self._receipt_or_dead_letter(waiter, reply[0])
                if receipt is not None:
                    receipts.append((waiter, receipt))
        return receipts

    async def _receipt_or_dead_letter(self, waiter: Waiter, entry: Entry) -> Receipt | None:
        stream_id, fields = entry
        try:
            event = decode_fields(fields)
            if not isinstance(event, Signal):
                raise MalformedEvent(f"a {type(event).__name__} event on a signal channel")
        except MalformedEvent as exc:
            # Poison never stalls the wait: move it aside and read the next entry.
            log.warning("swarm %s: poison entry %s on %s for %s: %s", self.keys.swarm, stream_id,
                        waiter.channel, waiter.coordinator, exc.reason, extra={
                            "event": "dead_lettered", "swarm": self.keys.swarm,
                            "channel": waiter.channel, "coordinator": waiter.coordinator,
                            "stream_id": stream_id, "reason": exc.reason})
            await self.store.dead_letter(self.keys, waiter.stream, waiter.coordinator, entry,
                                         exc.reason)
            self.dead_lettered += 1
            self._dirty.add(waiter)
            return None
        waiter.signal = event
        return waiter.receipt(event, stream_id)

    async def _acknowledge(self, receipts: list[tuple[Waiter, Receipt]]) -> None:
        if not receipts:
            return
        for waiter, receipt in receipts:
            waiter.unconfirmed = receipt  # until the reply says it was applied
        results = await self.store.receive_many([r for _, r in receipts])
        for (waiter, receipt), result in zip(receipts, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, BusUnavailable):
                    raise result
                self._settle(waiter, error=result)
                continue
            waiter.unconfirmed = None
            waiter.stream_id = receipt.stream_id
            waiter.ack_id = result
            self.delivered += 1
            self._settle(waiter)

    # -- helpers -------------------------------------------------------------------------------

    def _settle(self, waiter: Waiter, *, error: BaseException | None = None) -> None:
        waiter.error = error
        self._forget(waiter)
        waiter.settled.set()

    def _forget(self, waiter: Waiter) -> None:
        self._dirty.discard(waiter)
        watchers = self._by_stream.get(waiter.stream)
        if watchers is not None:
            watchers.discard(waiter)
            if not watchers:
                del self._by_stream[waiter.stream]

    def _cursors_of_watched(self) -> dict[str, str]:
        return {stream: self._cursors.get(stream, "0-0") for stream in self._by_stream}

    def _after_disconnect(self, exc: BusUnavailable, down_for_s: float) -> None:
        log.warning("swarm %s: Redis unavailable for %.3f s: %s", self.keys.swarm, down_for_s, exc,
                    extra={"event": "bus_unavailable", "swarm": self.keys.swarm})
        for watchers in self._by_stream.values():
            for waiter in watchers:
                # A reply lost with the connection may have delivered entries into the PEL.
                waiter.pending_first = True
                self._dirty.add(waiter)
        for watchers in list(self._by_stream.values()):
            for waiter in list(watchers):
                if down_for_s > waiter.reconnect_budget_s:
                    self._settle(waiter, error=BusUnavailable(
                        f"Redis unreachable for {down_for_s:.1f} s "
                        f"(reconnect budget {waiter.reconnect_budget_s} s)"))

    def _wake(self) -> None:
        self._work.set()
        if self._blocked and not self._kicking and self._tg is not None:
            self._kicking = True
            self._tg.start_soon(self._kick)

    async def _kick(self) -> None:
        """Interrupt the blocking read so it picks up new waiters now, not after ``BLOCK``.

        ``CLIENT UNBLOCK`` answers 0 when the read has not reached the server yet; try again
        briefly until it lands or the read returns on its own.
        """
        try:
            for _ in range(_KICK_ATTEMPTS):
                client_id = self._reader.client_id
                if not self._blocked or client_id is None:
                    return
                if await self.store.unblock(client_id):
                    return
                await anyio.sleep(0.001)
        except StreambusError as exc:
            log.debug("could not interrupt the blocking read: %s", exc)
        finally:
            self._kicking = False

    async def aclose(self) -> None:
        await self._reader.aclose()


def _min_id(a: str | None, b: str) -> str:
    if a is None:
        return b
    return a if stream_id_tuple(a) <= stream_id_tuple(b) else b
