"""The bus: publish signals, wait for them, and wait for their ACKs.

>>> async with streambus.connect() as bus:                       # doctest: +SKIP
...     await bus.publish("epic-7", "loop2-done", {"verdict": "PASS"}, sender="validator-1")
...     delivery = await bus.wait_for("epic-7", "coordinator-a", "loop2-done", timeout=60)
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar

import anyio
import anyio.abc
import msgspec

from streambus.backoff import Backoff, retry_within
from streambus.config import DEFAULT_RECONNECT_BUDGET_S, DEFAULT_WAIT_TIMEOUT_S, Settings
from streambus.dispatch import Dispatcher
from streambus.errors import AckTimeout, BusUnavailable, InvalidInput, PayloadTooLarge
from streambus.keys import SwarmKeys, validate_id
from streambus.liveness import BeatBatcher, Liveness
from streambus.retries import (
    DEFAULT_BACKLOG_LIMIT,
    RetryHandler,
    RetrySent,
    new_request_id,
    request_retry,
)
from streambus.schema import (
    BlockingState,
    Event,
    RetryRequest,
    Signal,
    encode,
    stream_id_ms,
)
from streambus.store import Durability, Limits, Store
from streambus.tracing import current_carrier, trace_id_of

if TYPE_CHECKING:
    from streambus.coordinator import Coordinator
    from streambus.hooks import Hooks

log = logging.getLogger("streambus")

T = TypeVar("T")
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
                 block_ms: int = 2000) -> None:
        self.store = store
        self.namespace = validate_id(namespace, "namespace")
        self.publish_retry_budget_s = publish_retry_budget_s
        self.block_ms = block_ms
        self._dispatchers: dict[str, Dispatcher] = {}
        self.beats = BeatBatcher(store)
        """Every coordinator of this process beats through it: one call per batch."""
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
        durability: Durability = "none",
    ) -> Published:
        """Publish a signal on ``channel`` once per ``signal_id``; optionally wait for ACKs.

        A ``signal_id`` published again within 24 h is reported as ``duplicate`` and appended
        nowhere. Connection errors are retried with capped, jittered backoff for
        ``publish_retry_budget_s`` (safe: the id makes the publish idempotent). With
        ``await_acks``, raises :class:`AckTimeout` naming who did not acknowledge in time.

        ``durability``: "none" returns once the server has the signal in memory (with AOF
        ``everysec``, a server crash may lose the last second); "fsync" once it is in the
        server's append-only file on disk (Redis >= 7.2 or Valkey); "replicated" once a replica
        has it (a failover may still lose it if that replica is not the one promoted). A level
        not confirmed within a second raises :class:`DurabilityNotReached`; the signal *was*
        appended, and publishing it again with the same id is safe.

        ``trace``: the W3C trace-context carrier the signal carries (for the trace projector);
        by default the current OpenTelemetry span's, if any. ``{}`` sends none.
        """
        keys = self.keys(swarm)
        signal_id = validate_id(signal_id or uuid.uuid4().hex, "signal id")
        awaited = [validate_id(c, "coordinator id") for c in await_acks]
        keys.channel(channel)
        if sender:
            validate_id(sender, "sender id")
        event = Signal(signal_id=signal_id, swarm=swarm, channel=channel, sender=sender,
                       payload=payload, trace=current_carrier() if trace is None else trace)
        raw = _encode_checked(event)
        stream_id, duplicate = await self.retrying(
            lambda: self.store.publish(keys, channel, signal_id, raw, durability=durability)
        )
        log.info("published signal %s on %s/%s as %s%s", signal_id, swarm, channel, stream_id,
                 " (duplicate)" if duplicate else "", extra={
                     "event": "published", "swarm": swarm, "channel": channel,
                     "signal_id": signal_id, "stream_id": stream_id, "duplicate": duplicate,
                     "trace_id": trace_id_of(event.trace)})
        acked: tuple[str, ...] = ()
        if awaited:
            try:
                acked = await self.wait_for_acks(swarm, signal_id, awaited, timeout=ack_timeout)
            except AckTimeout as exc:
                exc.published = Published(signal_id, stream_id, duplicate,
                                          acked_by=exc.acked_by, missing_acks=exc.missing)
                raise
        return Published(signal_id, stream_id, duplicate, acked_by=acked)

    async def request_retry(
        self,
        swarm: str,
        coordinator: str,
        *,
        reason: str = "",
        blockers: Iterable[str] = (),
        payload: Any = None,
        requested_by: str = "",
        iteration: int = 0,
        request_id: str | None = None,
        backlog_limit: int = DEFAULT_BACKLOG_LIMIT,
        wait: float = 0.0,
    ) -> RetrySent:
        """Ask ``coordinator`` to redo work; it handles the request even while it blocks.

        Idempotent by ``request_id``. Raises :class:`Backpressure` when the coordinator's
        backlog is at ``backlog_limit`` (after retrying for up to ``wait`` seconds).
        """
        request = RetryRequest(
            coordinator=validate_id(coordinator, "coordinator id"),
            request_id=validate_id(request_id or new_request_id(), "request id"),
            requested_by=requested_by, reason=reason, blockers=list(blockers), payload=payload,
            iteration=iteration)
        _encode_checked(request)
        return await request_retry(self.store, self.keys(swarm), request,
                                   backlog_limit=backlog_limit, wait=wait)

    async def wait_for_acks(
        self, swarm: str, signal_id: str, coordinators: Iterable[str], *, timeout: float
    ) -> tuple[str, ...]:
        """Wait until every named coordinator acknowledged ``signal_id``; return them in order.

        Raises :class:`AckTimeout` (listing who did and did not) when ``timeout`` passes first.
        """
        keys = self.keys(swarm)
        wanted = list(dict.fromkeys(validate_id(c, "coordinator id") for c in coordinators))
        reader = self.store.blocking_reader(block_ms=min(self.block_ms, 1000))
        acked: dict[str, str] = {}
        try:
            with anyio.move_on_after(timeout):
                backoff = Backoff()
                while True:
                    try:
                        missing = [c for c in wanted if c not in acked]
                        last_id, new = await self.store.acks_snapshot(keys, signal_id, missing)
                        acked.update(new)
                        if len(new) == len(missing):
                            return tuple(wanted)
                        await reader.read({keys.acks: last_id})
                        backoff.reset()
                    except BusUnavailable:
                        # ACKs are recorded durably; keep asking until the timeout.
                        await backoff.sleep()
        finally:
            with anyio.CancelScope(shield=True):
                await reader.aclose()
        have = [c for c in wanted if c in acked]
        raise AckTimeout(signal_id, have, [c for c in wanted if c not in acked])

    async def retrying(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run an idempotent operation, retrying connection errors with capped, jittered
        backoff for ``publish_retry_budget_s`` (each attempt is bounded by the socket timeout).
        """
        return await retry_within(operation, self.publish_retry_budget_s)

    # -- waiting -------------------------------------------------------------------------------

    def coordinator(self, swarm: str, coordinator_id: str, *,
                    liveness: Liveness | None = None, hooks: Hooks | None = None
                    ) -> Coordinator:
        """A handle for one coordinator of ``swarm`` (see :class:`Coordinator`)."""
        from streambus.coordinator import Coordinator

        return Coordinator(self, swarm, coordinator_id, liveness=liveness, hooks=hooks)

    async def wait_for(
        self,
        swarm: str,
        coordinator: str,
        channel: str,
        *,
        timeout: float = DEFAULT_WAIT_TIMEOUT_S,
        iteration: int = 0,
        watch: Sequence[str] = (),
        reconnect_budget: float = DEFAULT_RECONNECT_BUDGET_S,
        on_retry: RetryHandler | None = None,
    ) -> Delivery:
        """Shorthand for ``bus.coordinator(swarm, coordinator).wait_for(channel, ...)``."""
        return await self.coordinator(swarm, coordinator).wait_for(
            channel, timeout=timeout, iteration=iteration, watch=watch,
            reconnect_budget=reconnect_budget, on_retry=on_retry)

    async def dispatcher(self, keys: SwarmKeys) -> Dispatcher:
        """The dispatcher serving ``keys.swarm`` in this process, started on first use."""
        if self._tg is None:
            raise RuntimeError("use the Bus as an async context manager (async with connect())")
        async with self._dispatcher_lock:
            dispatcher = self._dispatchers.get(keys.swarm)
            if dispatcher is None:
                dispatcher = Dispatcher(self.store, keys, block_ms=self.block_ms)
                await self._tg.start(dispatcher.run)
                self._dispatchers[keys.swarm] = dispatcher
        return dispatcher

    async def status(self, swarm: str) -> list[dict[str, Any]]:
        """The blocking view of ``swarm``: every coordinator, its state, since when, on what,
        its deadline, how long since its last heartbeat, its retry backlog and whom it watches.

        Times are server time: ``*_ms`` fields in ms, ``since``/``deadline`` in epoch seconds.
        Coordinators that only heartbeat (never waited) appear with state ``idle``.
        """
        snap = await self.store.swarm_snapshot(self.keys(swarm))
        rows = {}
        for raw in snap.states:
            row: dict[str, Any] = dict(raw)
            for name in ("started_ms", "deadline_ms", "updated_ms", "ended_ms", "iteration"):
                if name in row:
                    row[name] = int(row[name])
            rows[row.get("coordinator", "")] = row
        for coordinator in snap.beats.keys() - rows.keys():
            rows[coordinator] = {"coordinator": coordinator, "state": "idle"}
        return [_view_row(rows[c], snap.now_ms, snap.beats.get(c), snap.backlog.get(c, 0))
                for c in sorted(rows)]


def _view_row(row: dict[str, Any], now_ms: int, beat_ms: int | None, backlog: int
              ) -> dict[str, Any]:
    waiting = row.get("state") == BlockingState.WAITING
    since_ms = row.get("started_ms") if waiting else row.get("ended_ms", row.get("updated_ms"))
    row["since"] = since_ms / 1000 if since_ms is not None else None
    row["deadline"] = row["deadline_ms"] / 1000 if "deadline_ms" in row else None
    if waiting and "deadline_ms" in row:
        row["remaining_s"] = max(0.0, (row["deadline_ms"] - now_ms) / 1000)
    row["last_heartbeat_age_s"] = (now_ms - beat_ms) / 1000 if beat_ms is not None else None
    row["retries_pending"] = backlog
    row["watches"] = [p for p in row.get("watches", "").split(",") if p]
    row.setdefault("channel", None)
    return row


def _encode_checked(event: Event) -> bytes:
    """Encode an event built from caller input: bad payloads are InvalidInput, not crashes."""
    try:
        raw = encode(event)
    except (TypeError, ValueError, msgspec.EncodeError) as exc:
        raise InvalidInput(f"payload is not JSON-serialisable: {exc}") from None
    except RecursionError:
        raise InvalidInput("payload is nested too deeply to encode") from None
    return _check_size(raw)


def _check_size(raw: bytes) -> bytes:
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(
            f"event is {len(raw)} bytes encoded; the limit is {MAX_PAYLOAD_BYTES} bytes"
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

    ``options`` go to :class:`Bus` (``publish_retry_budget_s``, ``block_ms``).
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
