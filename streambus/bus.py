"""The bus: publish signals, wait for them, and wait for their ACKs.

>>> async with streambus.connect() as bus:                       # doctest: +SKIP
...     await bus.publish("epic-7", "loop2-done", {"verdict": "PASS"}, sender="validator-1")
...     delivery = await bus.wait_for("epic-7", "coordinator-a", "loop2-done", timeout=60)
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, Final

import anyio
import anyio.abc
import msgspec

from streambus.config import DEFAULT_WAIT_TIMEOUT_S, Settings
from streambus.dispatch import Dispatcher, Waiter, backoff_delay
from streambus.errors import AckTimeout, BusUnavailable, InvalidInput, PayloadTooLarge, WaitTimeout
from streambus.keys import SwarmKeys, validate_id
from streambus.schema import (
    BlockingEnded,
    BlockingState,
    Outcome,
    Signal,
    encode,
    stream_id_ms,
)
from streambus.store import Limits, Store, WaitStart

log = logging.getLogger("streambus")

MAX_PAYLOAD_BYTES: Final = 1024 * 1024
_END_WAIT_LIMIT_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class Published:
    """The result of a publish."""

    signal_id: str
    stream_id: str
    duplicate: bool
    acked_by: tuple[str, ...] = ()
    missing_acks: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "signal_id": self.signal_id, "stream_id": self.stream_id,
            "duplicate": self.duplicate, "acked_by": list(self.acked_by),
            "missing_acks": list(self.missing_acks),
        }


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


class Bus:
    """A connection to the bus. Create with :func:`connect`; use as an async context manager."""

    def __init__(self, store: Store, namespace: str, *, publish_retry_budget_s: float = 10.0,
                 reconnect_budget_s: float = 300.0, block_ms: int = 2000) -> None:
        self.store = store
        self.namespace = validate_id(namespace, "namespace")
        self.publish_retry_budget_s = publish_retry_budget_s
        self.reconnect_budget_s = reconnect_budget_s
        self.block_ms = block_ms
        self._dispatchers: dict[str, Dispatcher] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._exit_stack: contextlib.AsyncExitStack | None = None
        self._dispatcher_lock = anyio.Lock()

    def __repr__(self) -> str:
        return (f"<Bus {self.store.url_redacted!r} namespace={self.namespace!r} "
                f"dispatchers={sorted(self._dispatchers)}>")

    async def __aenter__(self) -> Bus:
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            self._tg = await stack.enter_async_context(anyio.create_task_group())
        except BaseException:
            await stack.aclose()
            raise
        self._exit_stack = stack
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the dispatchers and close every connection. Safe to call twice."""
        stack, self._exit_stack = self._exit_stack, None
        if stack is None:
            return
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
        try:
            await stack.aclose()
        finally:
            with anyio.CancelScope(shield=True):
                for dispatcher in self._dispatchers.values():
                    await dispatcher.aclose()
                await self.store.aclose()

    def keys(self, swarm: str) -> SwarmKeys:
        return SwarmKeys.for_swarm(self.namespace, swarm)

    # -- publishing ----------------------------------------------------------------------------

    async def publish(
        self,
        swarm: str,
        channel: str,
        payload: Any = None,
        *,
        sender: str = "",
        signal_id: str | None = None,
        await_acks: Iterable[str] = (),
        ack_timeout: float = 30.0,
        trace: dict[str, str] | None = None,
    ) -> Published:
        """Publish a signal on ``channel`` once per ``signal_id``; optionally wait for ACKs.

        A ``signal_id`` published again within 24 h is reported as ``duplicate`` and appended
        nowhere. Connection errors are retried with capped, jittered backoff for
        ``publish_retry_budget_s`` (safe: the id makes the publish idempotent). With
        ``await_acks``, raises :class:`AckTimeout` naming who did not acknowledge in time.
        """
        keys = self.keys(swarm)
        signal_id = validate_id(signal_id or uuid.uuid4().hex, "signal id")
        awaited = [validate_id(c, "coordinator id") for c in await_acks]
        keys.channel(channel)
        if sender:
            validate_id(sender, "sender id")
        event = Signal(signal_id=signal_id, swarm=swarm, channel=channel, sender=sender,
                       payload=payload, trace=trace or {})
        raw = _encode_payload(event)
        stream_id, duplicate = await self._retrying(
            lambda: self.store.publish(keys, channel, signal_id, raw)
        )
        log.info("published signal %s on %s/%s as %s%s", signal_id, swarm, channel, stream_id,
                 " (duplicate)" if duplicate else "")
        acked: tuple[str, ...] = ()
        if awaited:
            acked = await self.wait_for_acks(swarm, signal_id, awaited, timeout=ack_timeout)
        return Published(signal_id, stream_id, duplicate, acked_by=acked)

    async def wait_for_acks(
        self, swarm: str, signal_id: str, coordinators: Iterable[str], *, timeout: float
    ) -> tuple[str, ...]:
        """Wait until every named coordinator acknowledged ``signal_id``; return them in order.

        Raises :class:`AckTimeout` (listing who did and did not) when ``timeout`` passes first.
        """
        keys = self.keys(swarm)
        wanted = [validate_id(c, "coordinator id") for c in coordinators]
        reader = self.store.blocking_reader(block_ms=min(self.block_ms, 1000))
        acked: dict[str, str] = {}
        try:
            with anyio.move_on_after(timeout):
                attempt = 0
                while True:
                    try:
                        last_id, acked = await self.store.acks_snapshot(keys, signal_id)
                        if all(c in acked for c in wanted):
                            return tuple(wanted)
                        await reader.read({keys.acks: last_id})
                        attempt = 0
                    except BusUnavailable:
                        # ACKs are recorded durably; keep asking until the timeout.
                        await anyio.sleep(backoff_delay(attempt))
                        attempt += 1
        finally:
            with anyio.CancelScope(shield=True):
                await reader.aclose()
        have = [c for c in wanted if c in acked]
        raise AckTimeout(signal_id, have, [c for c in wanted if c not in acked])

    async def _retrying(self, operation: Any) -> Any:
        attempt = 0
        with anyio.fail_after(self.publish_retry_budget_s + 5):
            started = anyio.current_time()
            while True:
                try:
                    return await operation()
                except BusUnavailable:
                    if anyio.current_time() - started > self.publish_retry_budget_s:
                        raise
                    await anyio.sleep(backoff_delay(attempt))
                    attempt += 1

    # -- waiting -------------------------------------------------------------------------------

    def coordinator(self, swarm: str, coordinator_id: str) -> Coordinator:
        """A handle for one coordinator of ``swarm``."""
        return Coordinator(self, swarm, coordinator_id)

    async def wait_for(self, swarm: str, coordinator: str, channel: str, *,
                       timeout: float = DEFAULT_WAIT_TIMEOUT_S, iteration: int = 0) -> Delivery:
        """Shorthand for ``bus.coordinator(swarm, coordinator).wait_for(channel, ...)``."""
        return await self.coordinator(swarm, coordinator).wait_for(
            channel, timeout=timeout, iteration=iteration
        )

    async def dispatcher(self, keys: SwarmKeys) -> Dispatcher:
        """The dispatcher serving ``keys.swarm`` in this process, started on first use."""
        if self._tg is None:
            raise RuntimeError("use the Bus as an async context manager (async with connect())")
        async with self._dispatcher_lock:
            dispatcher = self._dispatchers.get(keys.swarm)
            if dispatcher is None:
                dispatcher = Dispatcher(self.store, keys, block_ms=self.block_ms,
                                        reconnect_budget_s=self.reconnect_budget_s)
                await self._tg.start(dispatcher.run)
                self._dispatchers[keys.swarm] = dispatcher
        return dispatcher

    async def status(self, swarm: str) -> list[dict[str, Any]]:
        """Every coordinator of ``swarm`` the index lists, with its recorded blocking state."""
        keys = self.keys(swarm)
        now_ms = await self.store.time_ms()
        rows = []
        for raw in await self.store.coordinator_states(keys):
            row: dict[str, Any] = dict(raw)
            for name in ("started_ms", "deadline_ms", "updated_ms", "ended_ms", "iteration"):
                if name in row:
                    row[name] = int(row[name])
            if "deadline_ms" in row and row.get("state") == BlockingState.WAITING:
                row["remaining_s"] = max(0.0, (row["deadline_ms"] - now_ms) / 1000)
            rows.append(row)
        return sorted(rows, key=lambda r: r.get("coordinator", ""))


class Coordinator:
    """One coordinator of a swarm: it waits for signals on channels, one at a time."""

    def __init__(self, bus: Bus, swarm: str, coordinator_id: str) -> None:
        self.bus = bus
        self.keys = bus.keys(swarm)
        self.swarm = swarm
        self.id = validate_id(coordinator_id, "coordinator id")
        self._waiter: Waiter | None = None

    def __repr__(self) -> str:
        waiting = (f" waiting on {self._waiter.channel!r} iteration={self._waiter.iteration}"
                   if self._waiter else "")
        return f"<Coordinator {self.id!r} swarm={self.swarm!r}{waiting}>"

    async def wait_for(self, channel: str, *, timeout: float = DEFAULT_WAIT_TIMEOUT_S,
                       iteration: int = 0) -> Delivery:
        """Block until a signal arrives on ``channel``; acknowledge it and return it.

        The deadline is ``timeout`` from now in *server* time, recorded in the coordinator's
        blocking state: if this coordinator restarts and waits on the same channel again, the
        original deadline holds. A signal published before the wait began is delivered at once.
        Raises :class:`WaitTimeout` at the deadline.
        """
        stream = self.keys.channel(channel)
        if timeout < 0:
            raise InvalidInput(f"timeout must not be negative, got {timeout}")
        start = await self.bus._retrying(lambda: self.bus.store.begin_wait(
            self.keys, self.id, channel, max(1, round(timeout * 1000)), iteration
        ))
        log.info("coordinator %s %s waiting on %s/%s (iteration %d, deadline in %.3f s)", self.id,
                 "resumed" if start.resumed else "started", self.swarm, channel, start.iteration,
                 (start.deadline_ms - start.now_ms) / 1000)
        dispatcher = await self.bus.dispatcher(self.keys)
        waiter = Waiter(self.keys, self.id, channel, stream, start.iteration)
        self._waiter = waiter
        try:
            return await self._block(dispatcher, waiter, start)
        finally:
            self._waiter = None

    async def _block(self, dispatcher: Dispatcher, waiter: Waiter, start: WaitStart) -> Delivery:
        remaining_ms = start.deadline_ms - start.now_ms
        dispatcher.add(waiter)
        try:
            # The deadline is server time; the local monotonic clock only measures the
            # remaining span, so a skewed wall clock cannot move it.
            with anyio.move_on_after(max(0, remaining_ms) / 1000):
                await waiter.settled.wait()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await dispatcher.withdraw(waiter, abandon=True)
                if not waiter.settled.is_set() or waiter.signal is None:
                    await self._end(waiter, Outcome.CANCELLED, "wait cancelled")
            raise
        if not waiter.settled.is_set():
            await dispatcher.withdraw(waiter, abandon=False)
        if waiter.error is not None:
            outcome = (Outcome.BUS_UNAVAILABLE if isinstance(waiter.error, BusUnavailable)
                       else Outcome.FAILED)
            await self._end(waiter, outcome, str(waiter.error))
            raise waiter.error
        if waiter.signal is None or not waiter.ack_id:
            await self._end(waiter, Outcome.TIMEOUT, "deadline reached")
            raise WaitTimeout(self.id, waiter.channel, start.deadline_ms)
        log.info("coordinator %s received signal %s on %s/%s (%s)", self.id,
                 waiter.signal.signal_id, self.swarm, waiter.channel, waiter.stream_id)
        return Delivery(waiter.signal, self.id, waiter.stream_id, waiter.ack_id, waiter.iteration)

    async def _end(self, waiter: Waiter, outcome: Outcome, detail: str) -> None:
        """Record the end of a wait; best effort when the bus is down."""
        event = encode(BlockingEnded(coordinator=self.id, channel=waiter.channel,
                                     iteration=waiter.iteration, outcome=outcome, detail=detail))
        log.info("coordinator %s wait on %s/%s ended: %s (%s)", self.id, self.swarm,
                 waiter.channel, outcome, detail)
        with anyio.CancelScope(shield=True), anyio.move_on_after(_END_WAIT_LIMIT_S):
            try:
                await self.bus.store.end_wait(self.keys, self.id, waiter.channel,
                                              waiter.iteration, BlockingState.after(outcome),
                                              event)
            except BusUnavailable as exc:
                log.warning("could not record %s for %s: %s", outcome, self.id, exc)


def _encode_payload(event: Signal) -> bytes:
    try:
        raw = encode(event)
    except (TypeError, msgspec.EncodeError) as exc:
        raise InvalidInput(f"payload is not JSON-serialisable: {exc}") from None
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(
            f"signal is {len(raw)} bytes encoded; the limit is {MAX_PAYLOAD_BYTES} bytes"
        )
    return raw


@contextlib.asynccontextmanager
async def connect(
    redis_url: str | None = None,
    *,
    namespace: str | None = None,
    limits: Limits | None = None,
    **options: Any,
) -> AsyncIterator[Bus]:
    """Connect to the bus at ``redis_url`` (or ``STREAMBUS_REDIS_URL``, or the embedded server).

    ``options`` go to :class:`Bus` (``publish_retry_budget_s``, ``reconnect_budget_s``,
    ``block_ms``).
    """
    settings = Settings.resolve(redis_url, namespace)
    url = settings.redis_url
    if url is None:
        from streambus.server import ensure_server

        url = (await anyio.to_thread.run_sync(ensure_server)).url
    store = Store(url, limits=limits or Limits())
    try:
        await store.ping()
    except BaseException:
        await store.aclose()
        raise
    bus = Bus(store, settings.namespace, **options)
    async with bus:
        yield bus
