"""The dispatcher: many waiting coordinators of one swarm share one blocking connection.

A naive waiter blocks in its own ``XREADGROUP`` on its own connection; a thousand of them in one
process cost a thousand connections and a thousand wake-ups per signal. Here each process runs
one dispatcher per swarm. It blocks in a single ``XREAD`` over every channel stream its waiters
watch (no group, so it moves nothing) and, when a stream grows, runs every interested waiter's
``XREADGROUP ... COUNT 1`` (non-blocking, through its own consumer group) in one script call,
then acknowledges every delivery in a second one. Two round trips per signal, whatever the
number of waiters.

Correctness rests on three rules:

* A waiter's first read is of its own pending entries (``ID 0``): whatever was delivered to it
  before a crash or a lost reply is delivered again before anything new.
* A stream's cursor is the last id probed *before* its waiters' group reads ran, so an entry
  appended between the read and the ``XREAD`` is newer than the cursor and wakes the dispatcher.
* A waiter that gives up (timeout or cancellation) before its delivery is acknowledged leaves the
  entry in its PEL, and the next wait of that coordinator reads it first.

A waiter's life is one :class:`WaiterState`, written by the dispatcher alone; its coordinator
only adds it, withdraws it and reads its :data:`Outcome`.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Final

import anyio
import anyio.abc

from streambus.backoff import keep_running, retry_within
from streambus.dispatch_store import DispatchStore, Reader
from streambus.errors import BusUnavailable, MalformedEvent, StreambusError, UnknownEvent
from streambus.keys import SwarmKeys
from streambus.schema import AnyEvent, Signal, decode_fields, stream_id_tuple
from streambus.store import Entry, GroupMissing, GroupRead, Receipt
from streambus.waiter import Outcome, Received, Waiter, WaiterState

log = logging.getLogger(__name__)

_KICK_ATTEMPTS: Final = 200
_SETTLE_LIMIT_S: Final = 10.0
"""How long a withdrawal waits for a delivery already in flight to land."""
_CONFIRM_LIMIT_S: Final = 5.0
_SERVE_CHUNK: Final = 256
"""Waiters read and acknowledged per round trip pair (the store's script chunk)."""


class Dispatcher:
    """Serves every waiter of one swarm in this process over one blocking connection."""

    def __init__(self, store: DispatchStore, keys: SwarmKeys, *, block_ms: int = 2000) -> None:
        self._store = store
        self.keys = keys
        self._reader: Reader = store.blocking_reader(block_ms=block_ms, route=keys.prefix)
        self._block_s = block_ms / 1000
        self._blocking = False
        """The current cycle is a blocking read (for counting how long the server is silent)."""
        self._by_stream: dict[str, set[Waiter]] = {}
        self._cursors: dict[str, str] = {}
        self._unprobed: set[str] = set()
        self._dirty: set[Waiter] = set()
        self._signals: dict[Waiter, Signal] = {}
        self._work = anyio.Event()
        self._blocked = False
        self._kicking = False
        self._tg: anyio.abc.TaskGroup | None = None
        self.delivered = 0
        self.dead_lettered = 0
        self.skipped = 0

    def __repr__(self) -> str:
        return (f"<Dispatcher swarm={self.keys.swarm!r} streams={len(self._by_stream)} "
                f"waiters={self.waiters}>")

    @property
    def waiters(self) -> int:
        """Waiters served now."""
        return sum(len(ws) for ws in self._by_stream.values())

    @property
    def quiescent(self) -> bool:
        """Every waiter served and the dispatcher blocked in its read (benchmarks wait for it)."""
        return not self._dirty and not self._unprobed and self._blocked

    # -- called by coordinators ----------------------------------------------------------------

    def add(self, waiter: Waiter) -> None:
        """Start serving ``waiter``: its pending entries first, then new ones."""
        watchers = self._by_stream.setdefault(waiter.stream, set())
        if not watchers and waiter.stream not in self._cursors:
            self._unprobed.add(waiter.stream)
        watchers.add(waiter)
        waiter.state = WaiterState.QUEUED
        self._dirty.add(waiter)
        self._wake()

    async def finish(self, waiter: Waiter, *, cancelled: bool) -> Outcome:
        """Stop serving ``waiter`` and return its outcome.

        A delivery in flight is let land (bounded). After a deadline it still counts, and a
        receipt whose reply was lost is confirmed (the receive script is idempotent), so a
        signal recorded as received is never reported as a timeout. After a cancellation
        whatever the in-flight read returns stays in the PEL for the coordinator's next wait.
        """
        if waiter.state is WaiterState.SETTLED:
            return waiter.outcome
        self._forget(waiter)
        if waiter.state is WaiterState.DELIVERING:
            if cancelled:
                waiter.state = WaiterState.ABANDONED
            with anyio.CancelScope(shield=True), anyio.move_on_after(_SETTLE_LIMIT_S):
                await waiter.settled.wait()
        if waiter.state is not WaiterState.SETTLED:
            waiter.state = WaiterState.WITHDRAWN
        if waiter.unconfirmed is not None and not cancelled:
            await self._confirm(waiter)
        return waiter.outcome

    def fail(self, waiter: Waiter, error: BaseException) -> None:
        """End ``waiter`` with ``error``, unless a delivery settles it first: one in flight
        is let land (a signal that arrived wins), and the error applies after it if not."""
        if waiter.state is WaiterState.SETTLED:
            return
        if waiter.state in (WaiterState.DELIVERING, WaiterState.ABANDONED):
            waiter.deferred = error
            return
        self._settle(waiter, error)

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve waiters until cancelled. Connection loss is retried, never fatal."""
        failing_since: float | None = None
        cycle_started = anyio.current_time()

        async def cycle() -> None:
            nonlocal cycle_started
            cycle_started = anyio.current_time()
            self._blocking = False
            try:
                await self._cycle()
            except BusUnavailable:
                raise
            except StreambusError as exc:
                # A verdict on the reads themselves (an ACL refusing them): no retry cures it,
                # so every waiter served now ends with it, and the dispatcher serves on.
                log.warning("swarm %s: %s", self.keys.swarm, exc,
                            extra={"event": "dispatch_failed", "swarm": self.keys.swarm})
                for watchers in list(self._by_stream.values()):
                    for waiter in list(watchers):
                        self.fail(waiter, exc)

        def unavailable(exc: Exception) -> None:
            # The server is counted unavailable from the start of the first operation that got
            # no answer, not from when the failure surfaced: a refused connection (a killed
            # server) surfaces at once, a frozen server or a cut link only at the socket
            # timeout; the reconnect budget must count both the same way.
            nonlocal failing_since
            if failing_since is None:
                # A blocking read owes no answer before its BLOCK time: silence counts from
                # then (or from the failure, if sooner: a refused connection).
                now = anyio.current_time()
                failing_since = (min(now, cycle_started + self._block_s) if self._blocking
                                 else cycle_started)
            self._after_disconnect(exc, anyio.current_time() - failing_since)

        def recovered() -> None:
            nonlocal failing_since
            if failing_since is not None:
                log.info("swarm %s: Redis reachable again after %.3f s", self.keys.swarm,
                         anyio.current_time() - failing_since,
                         extra={"event": "bus_reachable", "swarm": self.keys.swarm})
            failing_since = None

        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started()
                await keep_running(cycle, on_unavailable=unavailable,
                                   on_recovered=recovered)
        finally:
            with anyio.CancelScope(shield=True):
                await self._reader.aclose()

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
        self._blocked = self._blocking = True
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
        self._blocked = self._blocking = True
        try:
            entries = await self._reader.read_group(waiter.stream, waiter.coordinator,
                                                    waiter.coordinator, pending=False, count=1)
        except GroupMissing:
            await self._store.ensure_group(waiter.stream, waiter.coordinator)
            return
        finally:
            self._blocked = False
        if not entries or waiter.state is not WaiterState.QUEUED:
            return
        waiter.state = WaiterState.DELIVERING
        try:
            receipt = await self._receipt_or_dead_letter(waiter, entries[0])
            if receipt is not None:
                await self._acknowledge([(waiter, receipt)], on_reader=True)
        finally:
            self._landed(waiter)
        if waiter.state is WaiterState.SETTLED:
            # Let the coordinator return its signal before this loop goes round again.
            await anyio.lowlevel.checkpoint()

    async def _serve_dirty(self) -> None:
        batch = list(self._dirty)
        self._dirty.clear()
        probes = sorted(self._unprobed)
        self._unprobed.clear()
        chunks = [batch[i:i + _SERVE_CHUNK] for i in range(0, len(batch), _SERVE_CHUNK)]
        if len(chunks) <= 1:
            await self._serve_chunk(chunks[0] if chunks else [], probes)
            return
        if probes:
            # The probes come first, on their own: every chunk's reads must run after them
            # (the cursor rule), and chunks in flight together arrive in no set order.
            await self._serve_chunk([], probes)
        # Chunks in flight together, each on a connection of the pool: the server works on
        # some while this process settles others (whose waiters' tasks then run), instead
        # of every waiter settling after the last chunk.
        failures: list[Exception] = []

        async def serve(chunk: list[Waiter]) -> None:
            try:
                await self._serve_chunk(chunk, [])
            except Exception as exc:  # its waiters are queued again (see _serve_chunk)
                failures.append(exc)

        async with anyio.create_task_group() as tg:
            for chunk in chunks:
                tg.start_soon(serve, chunk)
        if failures:
            raise failures[0]

    async def _serve_chunk(self, waiters: list[Waiter], probes: list[str]) -> None:
        batch = [w for w in waiters if w.state is WaiterState.QUEUED]
        for waiter in batch:
            waiter.state = WaiterState.DELIVERING
        # A waiter whose receipt reply was lost must not read on: its entry may already be
        # acknowledged, so a fresh read would skip it. It confirms that receipt instead.
        receipts = [(w, w.unconfirmed) for w in batch if w.unconfirmed is not None]
        readers = [w for w in batch if w.unconfirmed is None]
        try:
            if readers or probes:
                last_ids, replies = await self._store.read_groups(
                    [GroupRead(w.stream, w.coordinator, w.read_pending) for w in readers],
                    probes)
                for stream, last_id in zip(probes, last_ids, strict=True):
                    self._cursors[stream] = _min_id(self._cursors.get(stream), last_id)
                receipts += await self._take_replies(readers, replies)
            await self._acknowledge(receipts)
        except BusUnavailable:
            self._dirty.update(w for w in batch if w.state is WaiterState.DELIVERING)
            self._unprobed.update(probes)
            raise
        finally:
            for waiter in batch:
                self._landed(waiter)

    async def _take_replies(
        self, batch: list[Waiter], replies: list[list[Entry] | BaseException]
    ) -> list[tuple[Waiter, Receipt]]:
        receipts: list[tuple[Waiter, Receipt]] = []
        decoded: dict[tuple[str, str], AnyEvent] = {}  # one signal, many waiters: decode once
        for waiter, reply in zip(batch, replies, strict=True):
            if isinstance(reply, GroupMissing):
                # The group vanished (a restart without persistence, or cleanup): recreate it
                # at the start of the stream and read again from the pending entries.
                await self._store.ensure_group(waiter.stream, waiter.coordinator)
                waiter.read_pending = True
                self._dirty.add(waiter)
            elif isinstance(reply, BaseException):
                if isinstance(reply, BusUnavailable):
                    raise reply
                self._settle(waiter, reply)
            elif not reply:
                # Nothing pending and nothing new (a pending read goes on to a new entry in
                # the same step): read new entries from now on, when the stream grows.
                waiter.read_pending = False
            elif waiter.state is WaiterState.ABANDONED:
                continue
            else:
                receipt = await self._receipt_or_dead_letter(waiter, reply[0], decoded)
                if receipt is not None:
                    receipts.append((waiter, receipt))
        return receipts

    async def _receipt_or_dead_letter(self, waiter: Waiter, entry: Entry,
                                      decoded: dict[tuple[str, str], AnyEvent] | None = None
                                      ) -> Receipt | None:
        stream_id, fields = entry
        try:
            known = None if decoded is None else decoded.get((waiter.stream, stream_id))
            event = decode_fields(fields) if known is None else known
            if decoded is not None:
                # An entry never changes: its decoding is shared (events are frozen).
                decoded[(waiter.stream, stream_id)] = event
            if not isinstance(event, Signal):
                raise MalformedEvent(f"a {type(event).__name__} event on a signal channel")
            if waiter.verify is not None and (problem := waiter.verify(event)) is not None:
                waiter.rejected.append(problem)  # a forgery wakes nobody: dead-lettered
                raise MalformedEvent(problem, fields)
        except UnknownEvent as exc:
            # A newer writer's event type: not for this reader, and not poison either.
            log.info("swarm %s: skipped %s on %s for %s", self.keys.swarm, exc.reason, stream_id,
                     waiter.coordinator)
            await self._store.skip_unknown(self.keys, waiter.stream, waiter.coordinator,
                                           stream_id)
            self.skipped += 1
            self._dirty.add(waiter)
            return None
        except MalformedEvent as exc:
            # Poison never stalls the wait: move it aside and read the next entry.
            log.warning("swarm %s: poison entry %s on %s for %s: %s", self.keys.swarm, stream_id,
                        waiter.channel, waiter.coordinator, exc.reason, extra={
                            "event": "dead_lettered", "swarm": self.keys.swarm,
                            "channel": waiter.channel, "coordinator": waiter.coordinator,
                            "stream_id": stream_id, "reason": exc.reason})
            await self._store.dead_letter(self.keys, waiter.stream, waiter.coordinator, entry,
                                          exc.reason)
            self.dead_lettered += 1
            self._dirty.add(waiter)
            return None
        self._signals[waiter] = event
        return waiter.receipt(event, stream_id)

    async def _acknowledge(self, receipts: list[tuple[Waiter, Receipt]], *,
                           on_reader: bool = False) -> None:
        if not receipts:
            return
        for waiter, receipt in receipts:
            waiter.unconfirmed = receipt  # until the reply says it was applied
        sent = [r for _, r in receipts]
        results = await (self._reader.receive(sent) if on_reader
                         else self._store.receive_many(sent))
        for (waiter, receipt), result in zip(receipts, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, BusUnavailable):
                    raise result
                self._settle(waiter, result)
                continue
            self._received(waiter, receipt, result)

    def _received(self, waiter: Waiter, receipt: Receipt, ack_id: str) -> None:
        waiter.unconfirmed = None
        signal = self._signals[waiter]
        self.delivered += 1
        self._settle(waiter, Received(signal, receipt.stream_id, ack_id))

    async def _confirm(self, waiter: Waiter) -> None:
        """The waiter gave up while a receipt's reply was lost: it may have been applied, so
        ask again (idempotent) rather than report a timeout for a signal recorded received."""
        receipt = waiter.unconfirmed
        assert receipt is not None
        budget = min(waiter.reconnect_budget_s, _CONFIRM_LIMIT_S)
        waiter.outcome = BusUnavailable(
            f"signal {receipt.signal_id} was delivered to {waiter.coordinator!r} but its "
            f"receipt could not be confirmed; the next wait on {waiter.channel!r} learns the "
            f"outcome (and returns the signal if it was received)")
        # The bus is often back within moments (a restart, a failover): retried, the receipt
        # is confirmed and the wait returns its signal late, not an error.
        with (anyio.CancelScope(shield=True), anyio.move_on_after(budget + _CONFIRM_LIMIT_S),
              contextlib.suppress(BusUnavailable)):
            [result] = await retry_within(lambda: self._store.receive_many([receipt]), budget)
            if isinstance(result, BaseException):
                waiter.outcome = result
            else:
                self._received(waiter, receipt, result)

    # -- helpers -------------------------------------------------------------------------------

    def _landed(self, waiter: Waiter) -> None:
        """A delivery attempt for ``waiter`` is over: back to the queue, or settle it."""
        if waiter.state is WaiterState.SETTLED:
            return
        if waiter.deferred is not None:
            self._settle(waiter, waiter.deferred)
        elif waiter.state is WaiterState.ABANDONED:
            waiter.state = WaiterState.WITHDRAWN
            waiter.settled.set()  # wakes a withdrawal waiting for the flight to land
        elif waiter.state is WaiterState.DELIVERING:
            if waiter in self._by_stream.get(waiter.stream, ()):
                waiter.state = WaiterState.QUEUED
            else:  # withdrawn at its deadline while in flight: nothing came
                waiter.state = WaiterState.WITHDRAWN
                waiter.settled.set()

    def _settle(self, waiter: Waiter, outcome: Outcome) -> None:
        waiter.outcome = outcome
        waiter.state = WaiterState.SETTLED
        self._signals.pop(waiter, None)
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

    def _after_disconnect(self, exc: Exception, down_for_s: float) -> None:
        log.warning("swarm %s: Redis unavailable for %.3f s: %s", self.keys.swarm, down_for_s, exc,
                    extra={"event": "bus_unavailable", "swarm": self.keys.swarm})
        for watchers in list(self._by_stream.values()):
            for waiter in list(watchers):
                # A reply lost with the connection may have delivered entries into the PEL.
                waiter.read_pending = True
                self._dirty.add(waiter)
                if down_for_s > waiter.reconnect_budget_s:
                    self._settle(waiter, BusUnavailable(
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
                if await self._store.unblock(client_id, self.keys.prefix):
                    return
                await anyio.sleep(0.001)
        except StreambusError as exc:
            log.debug("could not interrupt the blocking read: %s", exc)
        finally:
            self._kicking = False


def _min_id(a: str | None, b: str) -> str:
    if a is None:
        return b
    return a if stream_id_tuple(a) <= stream_id_tuple(b) else b
