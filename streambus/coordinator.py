"""A coordinator: it blocks until a signal arrives, beats while it blocks, watches its peers.

>>> coordinator = bus.coordinator("epic-7", "coordinator-a",            # doctest: +SKIP
...                               liveness=Liveness(heartbeat_interval=5, dead_after=120))
>>> delivery = await coordinator.wait_for("loop2-done", timeout=1800,   # doctest: +SKIP
...                                       watch=["coordinator-c"])
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import anyio
import anyio.abc

from streambus.config import DEFAULT_RECONNECT_BUDGET_S, DEFAULT_WAIT_TIMEOUT_S
from streambus.dispatch import Dispatcher
from streambus.errors import (
    BusUnavailable,
    InvalidInput,
    MalformedEvent,
    PeerDead,
    StreambusError,
    WaitTimeout,
)
from streambus.hooks import Hooks
from streambus.keys import validate_id
from streambus.liveness import Heartbeater, Liveness, PeerWatch
from streambus.retries import RetryConsumer, RetryHandler
from streambus.runtime import Runtime
from streambus.schema import (
    BlockingEnded,
    BlockingStarted,
    BlockingState,
    Outcome,
    Signal,
    SignalReceived,
    decode_fields,
    encode,
    stream_id_ms,
)
from streambus.signing import Keyring
from streambus.store import WaitStart
from streambus.tracing import trace_id_of
from streambus.waiter import Received, Waiter

log = logging.getLogger("streambus")

_END_WAIT_LIMIT_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class Delivery:
    """A signal a coordinator received and acknowledged."""

    signal: Signal
    coordinator: str
    stream_id: str
    ack_id: str
    iteration: int

    @property
    def latency_ms(self) -> int:
        """Publish to ACK, both read off the server clock (stream ids), so skew-free."""
        return stream_id_ms(self.ack_id) - stream_id_ms(self.stream_id)

    def as_dict(self) -> dict[str, Any]:
        s = self.signal
        return {
            "signal_id": s.signal_id, "swarm": s.swarm, "channel": s.channel, "sender": s.sender,
            "payload": s.payload, "stream_id": self.stream_id, "coordinator": self.coordinator,
            "iteration": self.iteration, "ack_id": self.ack_id, "latency_ms": self.latency_ms,
        }


class Coordinator:
    """One coordinator of a swarm: waits for signals on channels, one wait at a time.

    With ``liveness``, the coordinator heartbeats while it waits, and ``watch`` peers are
    judged by that policy's ``dead_after``.
    """

    def __init__(self, runtime: Runtime, swarm: str, coordinator_id: str, *,
                 liveness: Liveness | None = None, hooks: Hooks | None = None,
                 signing: Keyring | None = None) -> None:
        self._runtime = runtime
        self.signing = signing
        """The keys a ``require_signed`` wait verifies signals with, and its ACKs are signed
        with."""
        self._store = runtime.store
        self.keys = runtime.keys(swarm)
        self.swarm = swarm
        self.id = validate_id(coordinator_id, "coordinator id")
        self.liveness = liveness
        self.hooks = hooks
        """Lifecycle hooks (``streambus.hooks``): time-limited, never able to break a wait."""
        self._waiter: Waiter | None = None
        self._ended: set[Waiter] = set()
        """Waits whose end this coordinator recorded (or tried to)."""

    def __repr__(self) -> str:
        waiting = (f" waiting on {self._waiter.channel!r} iteration={self._waiter.iteration}"
                   if self._waiter else "")
        return f"<Coordinator {self.id!r} swarm={self.swarm!r}{waiting}>"

    def _facts(self, channel: str, iteration: int, event: str, **more: object
               ) -> dict[str, object]:
        """The fields of a transition's log record (``streambus.logs`` writes them as JSON)."""
        return {"event": event, "coordinator": self.id, "swarm": self.swarm, "channel": channel,
                "iteration": iteration, **more}

    @contextlib.asynccontextmanager
    async def heartbeating(self, interval: float | None = None) -> AsyncIterator[Heartbeater]:
        """Beat every ``interval`` (default: the liveness policy's) while the block runs."""
        seconds = interval or (self.liveness or Liveness()).heartbeat_interval
        beater = Heartbeater(self._store, self.keys, self.id, seconds,
                             batcher=self._runtime.beats)
        async with anyio.create_task_group() as tg:
            await tg.start(beater.run)
            try:
                yield beater
            finally:
                tg.cancel_scope.cancel()

    async def wait_for(
        self,
        channel: str,
        *,
        timeout: float = DEFAULT_WAIT_TIMEOUT_S,
        iteration: int = 0,
        watch: Sequence[str] = (),
        reconnect_budget: float = DEFAULT_RECONNECT_BUDGET_S,
        on_retry: RetryHandler | None = None,
        require_signed: bool = False,
    ) -> Delivery:
        """Block until a signal arrives on ``channel``; acknowledge it and return it.

        The deadline is ``timeout`` from now in *server* time, recorded in the coordinator's
        blocking state: if this coordinator restarts and waits on the same channel again, the
        original deadline holds. A signal published before the wait began is delivered at once.

        Raises :class:`WaitTimeout` at the deadline, :class:`PeerDead` when a ``watch`` peer's
        heartbeats lapse, :class:`BusUnavailable` when Redis stays unreachable for longer than
        ``reconnect_budget`` seconds. ``on_retry`` handles retry requests sent to this
        coordinator while it waits (each is acknowledged after the handler returns).

        ``require_signed``: deliver only signals signed with a key of the coordinator's keyring
        for this swarm and channel; any other goes to the dead-letter stream with its reason
        and wakes nobody (a timeout then names what was refused).
        """
        stream = self.keys.channel(channel)
        if require_signed and self.signing is None:
            raise InvalidInput("a wait that requires signed signals needs a signing key "
                               "(STREAMBUS_SIGNING_KEY or STREAMBUS_SIGNING_KEY_FILE)")
        peers = [validate_id(peer, "peer id") for peer in watch]
        if timeout < 0 or reconnect_budget < 0:
            raise InvalidInput("timeout and reconnect budget must not be negative")
        # The token names this wait on the bus: a retried begin_wait is the same wait, and a
        # wait whose begin_wait reply was lost can still be ended by it.
        token = secrets.token_hex(8)
        unhanded = (self.keys.prefix, self.id)
        claim = self._runtime.unclaimed.get(unhanded, "")
        try:
            start = await self._runtime.retrying(lambda: self._store.begin_wait(
                self.keys, self.id, channel, max(1, round(timeout * 1000)), iteration, peers,
                token=token, claim=claim))
        except BaseException:
            # The script may have run with its reply lost (to a cancellation, or to the bus):
            # then the wait is open on the bus with nobody in it. End it by its token; if the
            # script has not run yet, the token stops it from starting anything.
            with anyio.CancelScope(shield=True):
                await self._record_end(channel, 0, Outcome.CANCELLED,
                                       "cancelled before its start was confirmed", token=token)
            raise
        # Whatever that wait held, the server has answered for it now (or it moved on).
        self._runtime.unclaimed.pop(unhanded, None)
        if start.withdrawn:
            raise StreambusError(f"wait {token} of {self.id!r} was withdrawn before it began")
        log.info("coordinator %s %s waiting on %s/%s (iteration %d, deadline in %.3f s)", self.id,
                 "resumed" if start.resumed else "started", self.swarm, channel, start.iteration,
                 (start.deadline_ms - start.now_ms) / 1000,
                 extra=self._facts(channel, start.iteration, "blocking_started", state="waiting",
                                   resumed=start.resumed, deadline_ms=start.deadline_ms))
        if start.received_stream_id:
            try:
                return await self._recorded(channel, start)
            except BaseException as exc:
                if not isinstance(exc, StreambusError) or isinstance(exc, BusUnavailable):
                    # Not handed over (cancelled, or the bus went away): mark it unclaimed
                    # again, so the next wait returns it. A trimmed entry is final: not marked.
                    with anyio.CancelScope(shield=True):
                        await self._record_end(channel, start.iteration, Outcome.CANCELLED,
                                               "cancelled before its signal was handed over",
                                               started_ms=start.started_ms, token=token)
                raise
        waiter = Waiter(self.keys, self.id, channel, stream, start.iteration,
                        reconnect_budget_s=reconnect_budget, started_ms=start.started_ms,
                        token=token, signing=self.signing)
        if require_signed and (keyring := self.signing) is not None:
            waiter.verify = lambda signal: keyring.verify_signal(signal, self.swarm, channel)
        self._waiter = waiter
        try:
            async with self._runtime.dispatchers.lease(self.keys) as dispatcher:
                return await self._supervised(dispatcher, waiter, start, peers, on_retry)
        except BaseException:
            # Cancelled (or failed) before the wait blocked, e.g. while its heartbeat or retry
            # consumer started; or after its signal arrived but before wait_for returned it.
            # Either way the bus must learn it: an open wait is closed as cancelled, and a
            # signal received but never handed over is marked unclaimed for the next wait.
            if waiter not in self._ended:
                detail = ("cancelled before its signal was handed over"
                          if isinstance(waiter.outcome, Received)
                          else "cancelled before it blocked")
                with anyio.CancelScope(shield=True):
                    await self._end(waiter, Outcome.CANCELLED, detail)
            raise
        finally:
            self._waiter = None
            self._ended.discard(waiter)

    async def _recorded(self, channel: str, start: WaitStart) -> Delivery:
        """The signal this iteration already received (waiting again is idempotent)."""
        entry = await self._store.entry(self.keys.channel(channel), start.received_stream_id)
        if entry is None:
            raise StreambusError(f"iteration {start.iteration} of {self.id!r} received signal "
                                 f"{start.received_stream_id}, which has since been trimmed")
        signal = decode_fields(entry[1])
        if not isinstance(signal, Signal):
            raise MalformedEvent(f"entry {entry[0]} is a {type(signal).__name__}, not a signal")
        ack_id = await self._store.ack_id(self.keys, signal.signal_id, self.id)
        log.info("coordinator %s: iteration %d already received %s", self.id, start.iteration,
                 signal.signal_id, extra=self._facts(
                     channel, start.iteration, "signal_received", outcome=Outcome.SIGNALED,
                     signal_id=signal.signal_id, trace_id=trace_id_of(signal.trace)))
        return Delivery(signal, self.id, entry[0], ack_id, start.iteration)

    async def _supervised(self, dispatcher: Dispatcher, waiter: Waiter, start: WaitStart,
                          peers: list[str], on_retry: RetryHandler | None) -> Delivery:
        """Block, with the heartbeat, the peer watch and the retry consumer beside the wait."""
        if self.hooks is not None and self.hooks.configured("on_retry_request"):
            on_retry = self.hooks.retry_handler(on_retry)
        starting = self.hooks is not None and self.hooks.configured("on_blocking_start")
        if self.liveness is None and not peers and on_retry is None and not starting:
            return await self._block(dispatcher, waiter, start)  # nothing to run beside it
        failure: StreambusError | None = None
        async with anyio.create_task_group() as tg:
            if starting:  # beside the wait, so a slow hook never delays a delivery
                tg.start_soon(self._fire, "on_blocking_start", BlockingStarted(
                    coordinator=self.id, channel=waiter.channel, iteration=start.iteration,
                    started_ms=start.started_ms, deadline_ms=start.deadline_ms,
                    resumed=start.resumed))
            if self.liveness is not None:
                beater = Heartbeater(self._store, self.keys, self.id,
                                     self.liveness.heartbeat_interval,
                                     batcher=self._runtime.beats)
                await tg.start(beater.run)
            if peers:
                watch = PeerWatch(self._store, self.keys, peers, self.liveness or Liveness(),
                                  start.now_ms)
                tg.start_soon(self._escalate_when_dead, dispatcher, waiter, watch)
            if on_retry is not None:
                consumer = RetryConsumer(self._store, self.keys, self.id, on_retry)
                await tg.start(consumer.run)
            try:
                delivery = await self._block(dispatcher, waiter, start)
            except StreambusError as exc:
                failure = exc  # re-raised outside the task group, not as an ExceptionGroup
            tg.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return delivery

    async def _escalate_when_dead(self, dispatcher: Dispatcher, waiter: Waiter,
                                  watch: PeerWatch) -> None:
        dead = await watch.run()
        log.warning("coordinator %s: %s; ending its wait on %s", self.id, dead, waiter.channel,
                    extra=self._facts(waiter.channel, waiter.iteration, "peer_dead",
                                      peers=sorted(dead.peers)))
        dispatcher.fail(waiter, dead)

    async def _block(self, dispatcher: Dispatcher, waiter: Waiter, start: WaitStart) -> Delivery:
        dispatcher.add(waiter)
        try:
            # The deadline is server time; the local monotonic clock only measures the
            # remaining span, so a skewed wall clock cannot move it.
            with anyio.move_on_after(max(0, start.deadline_ms - start.now_ms) / 1000):
                await waiter.settled.wait()
        except BaseException:
            with anyio.CancelScope(shield=True):
                outcome = await dispatcher.finish(waiter, cancelled=True)
                # A receipt that landed meanwhile is recorded: the bus marks it unclaimed,
                # and this coordinator's next wait returns it instead of skipping it.
                await self._end(waiter, Outcome.CANCELLED, (
                    "cancelled before its signal was handed over"
                    if isinstance(outcome, Received) else "wait cancelled"))
            raise
        outcome = await dispatcher.finish(waiter, cancelled=False)
        if isinstance(outcome, BaseException):
            await self._end(waiter, _outcome_of(outcome), str(outcome))
            if isinstance(outcome, PeerDead):
                await self._fire("on_peer_dead", {
                    "coordinator": self.id, "swarm": self.swarm, "channel": waiter.channel,
                    "iteration": waiter.iteration, "peers": outcome.peers})
            raise outcome
        if outcome is None:
            await self._end(waiter, Outcome.TIMEOUT, "deadline reached")
            await self._fire("on_blocking_timeout", BlockingEnded(
                coordinator=self.id, channel=waiter.channel, iteration=waiter.iteration,
                outcome=Outcome.TIMEOUT, detail="deadline reached",
                started_ms=start.started_ms))
            raise WaitTimeout(self.id, waiter.channel, start.deadline_ms, waiter.rejected)
        signal = outcome.signal
        delivery = Delivery(signal, self.id, outcome.stream_id, outcome.ack_id, waiter.iteration)
        if log.isEnabledFor(logging.INFO):  # its facts cost a wake-up even when nobody logs
            log.info("coordinator %s received signal %s on %s/%s (%s)", self.id,
                     signal.signal_id, self.swarm, waiter.channel, outcome.stream_id,
                     extra=self._facts(waiter.channel, waiter.iteration, "signal_received",
                                       outcome=Outcome.SIGNALED, signal_id=signal.signal_id,
                                       latency_ms=delivery.latency_ms,
                                       trace_id=trace_id_of(signal.trace)))
        await self._fire("on_signal_received", SignalReceived(
            coordinator=self.id, channel=waiter.channel, iteration=waiter.iteration,
            signal_id=signal.signal_id, stream_id=outcome.stream_id,
            started_ms=start.started_ms))
        return delivery

    async def _fire(self, name: str, event: Any) -> None:
        """Run the hooks of ``name`` (bounded by their limits; failures are only logged)."""
        if self.hooks is not None and self.hooks.configured(name):
            await self.hooks.fire(name, event)

    async def _end(self, waiter: Waiter, outcome: Outcome, detail: str) -> None:
        """Record the end of a wait; best effort when the bus is down."""
        self._ended.add(waiter)
        await self._record_end(waiter.channel, waiter.iteration, outcome, detail,
                               started_ms=waiter.started_ms, token=waiter.token)

    async def _record_end(self, channel: str, iteration: int, outcome: Outcome, detail: str, *,
                          started_ms: int = 0, token: str = "") -> None:
        """Record how the wait ``token`` (iteration ``iteration``; 0: the one whose begin_wait
        reply was lost) ended.

        If that wait held a signal it never handed over, the bus marks the signal unclaimed
        instead. When the bus cannot be told, this process remembers the wait, so that its next
        wait on ``channel`` asks for that signal before it starts a new iteration.
        """
        event = encode(BlockingEnded(coordinator=self.id, channel=channel, iteration=iteration,
                                     outcome=outcome, detail=detail, started_ms=started_ms))
        log.info("coordinator %s wait on %s/%s ended: %s (%s)", self.id, self.swarm, channel,
                 outcome, detail, extra=self._facts(channel, iteration, "blocking_ended",
                                                    outcome=outcome, detail=detail))
        recorded = False
        with anyio.CancelScope(shield=True), anyio.move_on_after(_END_WAIT_LIMIT_S):
            try:
                await self._store.end_wait(self.keys, self.id, channel, iteration,
                                           BlockingState.after(outcome), event, token=token)
                recorded = True
            except StreambusError as exc:  # the bus is away, or refuses (an ACL)
                log.warning("could not record %s for %s: %s", outcome, self.id, exc,
                            extra=self._facts(channel, iteration, "record_failed",
                                              outcome=outcome))
        if not recorded and token:
            self._runtime.unclaimed[(self.keys.prefix, self.id)] = token


def _outcome_of(error: BaseException) -> Outcome:
    if isinstance(error, PeerDead):
        return Outcome.PEER_DEAD
    if isinstance(error, BusUnavailable):
        return Outcome.BUS_UNAVAILABLE
    return Outcome.FAILED
