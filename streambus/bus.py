"""The bus: publish signals, wait for them, and wait for their ACKs.

>>> async with streambus.connect() as bus:                       # doctest: +SKIP
...     await bus.publish("epic-7", "loop2-done", {"verdict": "PASS"}, sender="validator-1")
...     delivery = await bus.wait_for("epic-7", "coordinator-a", "loop2-done", timeout=60)
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import anyio
import anyio.abc
import msgspec

from streambus.backoff import Backoff
from streambus.config import DEFAULT_RECONNECT_BUDGET_S, DEFAULT_WAIT_TIMEOUT_S, Settings
from streambus.coordinator import Coordinator, Delivery
from streambus.errors import (
    AckTimeout,
    BusUnavailable,
    InvalidInput,
    MalformedEvent,
    PayloadTooLarge,
    UnknownEvent,
)
from streambus.hooks import Hooks
from streambus.keys import validate_id
from streambus.lease import Lease
from streambus.liveness import BeatBatcher, Liveness
from streambus.projection import Projection, Projector
from streambus.retries import (
    DEFAULT_BACKLOG_LIMIT,
    RetryHandler,
    RetrySent,
    new_request_id,
    request_retry,
)
from streambus.runtime import Dispatchers, Runtime
from streambus.schema import (
    Ack,
    Event,
    RetryRequest,
    Signal,
    decode_fields,
    encode,
)
from streambus.signing import Keyring
from streambus.store import Durability, Limits, Script, Store
from streambus.tracing import current_carrier, trace_id_of
from streambus.views import Views

log = logging.getLogger("streambus")

T = TypeVar("T")
MAX_PAYLOAD_BYTES: Final = 1024 * 1024


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


class Bus(Views):
    """A connection to the bus. Create with :func:`connect`; use as an async context manager."""

    def __init__(self, store: Store, namespace: str, *, publish_retry_budget_s: float = 10.0,
                 block_ms: int = 2000, dispatcher_idle_s: float = 30.0,
                 signing: Keyring | None = None) -> None:
        self._store = store
        self.signing = signing
        """Signs every signal published (and verifies ``require_signed`` waits), if set."""
        self.namespace = validate_id(namespace, "namespace")
        self.publish_retry_budget_s = publish_retry_budget_s
        self.block_ms = block_ms
        self._runtime = Runtime(
            store, self.namespace,
            Dispatchers(store, block_ms=block_ms, idle_s=dispatcher_idle_s),
            BeatBatcher(store), publish_retry_budget_s)
        self._tg: anyio.abc.TaskGroup | None = None
        self._exit_stack: contextlib.AsyncExitStack | None = None

    def __repr__(self) -> str:
        return (f"<Bus {self._store.url_redacted!r} namespace={self.namespace!r} "
                f"{self._runtime.dispatchers!r}>")

    @property
    def url(self) -> str:
        """The server's URL, credentials included (to hand to child processes through
        ``STREAMBUS_REDIS_URL``): never print or log it; use :attr:`url_redacted`."""
        return self._store.url

    @property
    def url_redacted(self) -> str:
        """The server's URL with any password replaced, fit for logs and output."""
        return self._store.url_redacted

    async def __aenter__(self) -> Bus:
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            await self._tg.start(self._runtime.dispatchers.run)
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
            self._tg.cancel_scope.cancel()  # each dispatcher closes its reader on the way out
        try:
            await stack.aclose()
        finally:
            with anyio.CancelScope(shield=True):
                await self._store.aclose()

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
        require_signed: bool = False,
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

        ``require_signed``: count only ACKs signed with the bus's keyring (``signing``); see
        :meth:`wait_for_acks`.
        """
        keys = self.keys(swarm)
        self._check_can_verify(require_signed)
        signal_id = validate_id(signal_id or uuid.uuid4().hex, "signal id")
        awaited = [validate_id(c, "coordinator id") for c in await_acks]
        keys.channel(channel)
        if sender:
            validate_id(sender, "sender id")
        key_id, sig = (self.signing.sign_signal(swarm, channel, signal_id, sender, payload)
                       if self.signing is not None else ("", ""))
        event = Signal(signal_id=signal_id, swarm=swarm, channel=channel, sender=sender,
                       payload=payload, trace=current_carrier() if trace is None else trace,
                       key_id=key_id, sig=sig)
        raw = _encode_checked(event)
        stream_id, duplicate = await self._runtime.retrying(
            lambda: self._store.publish(keys, channel, signal_id, raw, durability=durability)
        )
        if log.isEnabledFor(logging.INFO):
            log.info("published signal %s on %s/%s as %s%s", signal_id, swarm, channel,
                     stream_id, " (duplicate)" if duplicate else "", extra={
                         "event": "published", "swarm": swarm, "channel": channel,
                         "signal_id": signal_id, "stream_id": stream_id, "duplicate": duplicate,
                         "trace_id": trace_id_of(event.trace)})
        acked: tuple[str, ...] = ()
        if awaited:
            try:
                acked = await self.wait_for_acks(swarm, signal_id, awaited, timeout=ack_timeout,
                                                 require_signed=require_signed)
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
        return await self.send_retry(swarm, request, backlog_limit=backlog_limit, wait=wait)

    async def send_retry(self, swarm: str, request: RetryRequest, *,
                         backlog_limit: int = DEFAULT_BACKLOG_LIMIT, wait: float = 0.0
                         ) -> RetrySent:
        """Append a prepared :class:`RetryRequest` (see :meth:`request_retry`)."""
        _encode_checked(request)
        return await request_retry(self._store, self.keys(swarm), request,
                                   backlog_limit=backlog_limit, wait=wait)

    async def wait_for_acks(
        self, swarm: str, signal_id: str, coordinators: Iterable[str], *, timeout: float,
        require_signed: bool = False,
    ) -> tuple[str, ...]:
        """Wait until every named coordinator acknowledged ``signal_id``; return them in order.

        Raises :class:`AckTimeout` (listing who did and did not) when ``timeout`` passes first.

        ``require_signed``: an ACK counts only if it is signed with a key of the bus's keyring
        by the coordinator awaited, for this signal. Any other (unsigned, forged, altered) is
        moved to the dead-letter stream with its reason, counted, and named in the
        :class:`AckTimeout`; its coordinator stays awaited.
        """
        keys = self.keys(swarm)
        self._check_can_verify(require_signed)
        wanted = list(dict.fromkeys(validate_id(c, "coordinator id") for c in coordinators))
        reader = self._store.blocking_reader(block_ms=min(self.block_ms, 1000),
                                              route=keys.acks)
        acked: dict[str, str] = {}
        rejected: dict[str, tuple[str, str]] = {}  # coordinator -> (ack id, why)
        try:
            with anyio.move_on_after(timeout):
                backoff = Backoff()
                while True:
                    try:
                        missing = [c for c in wanted if c not in acked]
                        last_id, new = await self._store.acks_snapshot(keys, signal_id, missing)
                        if require_signed and new:
                            new = await self._verified_acks(swarm, signal_id, new, rejected)
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
        raise AckTimeout(signal_id, have, [c for c in wanted if c not in acked],
                         rejected={c: why for c, (_, why) in rejected.items() if c not in acked})

    def _check_can_verify(self, require_signed: bool) -> None:
        if require_signed and self.signing is None:
            raise InvalidInput("requiring signed ACKs needs a signing key (set "
                               "STREAMBUS_SIGNING_KEY or STREAMBUS_SIGNING_KEY_FILE)")

    async def _verified_acks(self, swarm: str, signal_id: str, recorded: dict[str, str],
                             rejected: dict[str, tuple[str, str]]) -> dict[str, str]:
        """The ACKs of ``recorded`` (coordinator -> ack id) that verify. Each one that does not
        is dead-lettered once (``rejected`` remembers it) and left out."""
        assert self.signing is not None
        keys = self.keys(swarm)
        entries = await self._store.ack_entries(keys, list(recorded.values()))
        verified: dict[str, str] = {}
        for (coordinator, ack_id), entry in zip(recorded.items(), entries, strict=True):
            try:
                ack = decode_fields(entry[1])
                why = (self.signing.verify_ack(ack, swarm, signal_id, coordinator)
                       if isinstance(ack, Ack) else f"entry {ack_id} is not an ACK")
            except (MalformedEvent, UnknownEvent) as exc:
                why = (f"ACK {ack_id!r} recorded for {coordinator!r} names no ACK entry "
                       "(trimmed, or never written)" if entry[1] is None else
                       f"ACK {ack_id} recorded for {coordinator!r} is unreadable: {exc}")
            if why is None:
                verified[coordinator] = ack_id
                continue
            if rejected.get(coordinator, ("", ""))[0] != ack_id:
                rejected[coordinator] = (ack_id, why)
                log.warning("rejected ACK of signal %s: %s", signal_id, why, extra={
                    "event": "ack_rejected", "swarm": swarm, "signal_id": signal_id,
                    "coordinator": coordinator, "ack_id": ack_id, "reason": why})
                await self._store.dead_letter(keys, keys.acks, "", entry, why, ack=False)
        return verified

    # -- waiting -------------------------------------------------------------------------------

    def coordinator(self, swarm: str, coordinator_id: str, *,
                    liveness: Liveness | None = None, hooks: Hooks | None = None
                    ) -> Coordinator:
        """A handle for one coordinator of ``swarm`` (see :class:`Coordinator`)."""
        return Coordinator(self._runtime, swarm, coordinator_id, liveness=liveness, hooks=hooks,
                           signing=self.signing)

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
        require_signed: bool = False,
    ) -> Delivery:
        """Shorthand for ``bus.coordinator(swarm, coordinator).wait_for(channel, ...)``."""
        return await self.coordinator(swarm, coordinator).wait_for(
            channel, timeout=timeout, iteration=iteration, watch=watch,
            reconnect_budget=reconnect_budget, on_retry=on_retry,
            require_signed=require_signed)

    # -- for projectors, watchdogs and applications on the bus --------------------------------

    def projector(self, swarm: str, projection: Projection, *, block_ms: int = 1000,
                  claim_idle: float = 30.0) -> Projector:
        """A :class:`~streambus.projection.Projector` applying ``projection`` to ``swarm``."""
        return Projector(self._store, self.keys(swarm), projection, block_ms=block_ms,
                         claim_idle=claim_idle)

    def lease(self, swarm: str, job: str, *, ttl: float = 10.0) -> Lease:
        """The :class:`~streambus.lease.Lease` of ``job`` on ``swarm``: run a job that must
        have one instance at a time (others stand by and take over when it lapses)."""
        return Lease(self._store, self.keys(swarm), job, ttl=ttl)

    async def report_dead(self, swarm: str, dead_after: float) -> list[str]:
        """Append a ``CoordinatorDead`` event for each coordinator of ``swarm`` whose
        heartbeats lapsed past ``dead_after`` (server time) since its last report; return
        them. Atomic: several watchdogs never report one lapse twice."""
        return await self._store.report_dead(self.keys(swarm), round(dead_after * 1000))

    async def run_script(self, swarm: str, script: Script, keys: Sequence[str],
                         args: Sequence[str | bytes | int | float]) -> Any:
        """Run an application's Lua ``script`` atomically on ``swarm``'s keys (the CFN Loop
        keeps its state machine this way). Every key must belong to ``swarm``, so the script
        runs in one Cluster slot; Redis errors arrive as :class:`StreambusError`s."""
        prefix = self.keys(swarm).prefix + ":"
        for key in keys:
            if not key.startswith(prefix):
                raise InvalidInput(f"key {key!r} is not a key of swarm {swarm!r}")
        return await self._store.run_script(script, keys, args)


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
    publish_retry_budget_s: float = 10.0,
    block_ms: int = 2000,
    dispatcher_idle_s: float = 30.0,
    signing: Keyring | None = None,
) -> AsyncIterator[Bus]:
    """Connect to the bus at ``redis_url`` (or ``STREAMBUS_REDIS_URL``, or the embedded server).

    ``publish_retry_budget_s``: how long an idempotent write (a publish, the start of a wait)
    retries a lost connection. ``block_ms``: how long one blocking read waits on the server
    before it is renewed (keep it well under the 5 s socket timeout). ``dispatcher_idle_s``:
    a swarm's dispatcher (a task and a connection) is retired after this long without waiters.
    ``signing``: the keys that sign every signal published and verify ``require_signed``
    waits (default: ``STREAMBUS_SIGNING_KEY`` / ``STREAMBUS_SIGNING_KEY_FILE``, if set).
    """
    settings = Settings.resolve(redis_url, namespace)
    signing = signing if signing is not None else Keyring.from_env()
    url = settings.redis_url
    if url is None:
        from streambus.server import ensure_server

        url = (await anyio.to_thread.run_sync(ensure_server)).url
    store = Store(url, limits=limits or Limits())
    try:
        await store.ping()
        bus = Bus(store, settings.namespace, publish_retry_budget_s=publish_retry_budget_s,
                  block_ms=block_ms, dispatcher_idle_s=dispatcher_idle_s, signing=signing)
    except BaseException:
        await store.aclose()
        raise
    async with bus:
        yield bus
