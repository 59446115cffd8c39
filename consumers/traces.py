"""The trace projector: the signal latency path as OpenTelemetry spans, timed by the server.

It follows a swarm's ``acks`` stream (group ``proj.traces``). Every ``Ack`` names the signal's
channel and stream id; the Ack's own entry id is the server time of receipt. From them it emits:

* ``signal <channel>``: from the signal's stream id (server time of publish) to the last Ack
  seen for it, a child of the publisher's span (the W3C carrier the signal carries); without a
  carrier it is the root of a trace of its own.
* ``deliver <coordinator>``, one per coordinator, a child of the signal span: from the signal's
  stream id to that coordinator's Ack id. Delivery and ACK are one atomic script on the
  server, so this is the publish-to-receipt latency, including any time before the coordinator
  began waiting (a late waiter is served at once from its group at id 0).

Start and end times come from stream ids, which ``XADD *`` takes from the server clock, so
clock skew between the publisher, the coordinators and this projector cannot distort them.

A deliver span is exported at once. A signal span stays open until no new Ack for it has come
for ``settle`` seconds of server time (or the projector stops), then ends at its last Ack. An
Ack that comes after that still gets its deliver span, under the ended signal span.

Replays change nothing: emitted (signal, coordinator) pairs are remembered (the last
``memory`` of them), so an Ack applied twice, or replayed by ``Projector.rebuild``, emits no
second span. One instance per swarm projects at a time: each runs under the swarm's ``traces``
lease (``streambus.lease``), and a second instance stands by until the first stops (it releases
the lease at once) or dies (the lease lapses after ``lease_ttl``); then it takes over from the
group's position. Two instances at once would split the Acks and each emit a signal span.

Run it as ``streambus traces SWARM [--settle 10s]``;
the exporter is OTLP over HTTP/protobuf, configured by the standard ``OTEL_*`` variables
(``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, headers, timeout,
compression, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_BSP_*``).
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

import anyio
import anyio.abc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind

from streambus import __version__
from streambus.bus import Bus
from streambus.errors import (
    BusUnavailable,
    InvalidId,
    InvalidInput,
    LeaseLost,
    MalformedEvent,
)
from streambus.keys import SwarmKeys, validate_id
from streambus.schema import Ack, AnyEvent, Signal, decode_fields, stream_id_ms
from streambus.tracing import context_from
from streambus.views import Views

log = logging.getLogger(__name__)

TRACER_NAME: Final = "streambus.traces"
DEFAULT_SETTLE_S: Final = 10.0
DEFAULT_LEASE_TTL_S: Final = 10.0
"""How long a dead trace projector's lease blocks a standby from taking over."""
DEFAULT_MEMORY: Final = 100_000
_SHUTDOWN_LIMIT_S: Final = 5.0
_STREAM_ID: Final = re.compile(r"\d{1,20}-\d{1,20}")
_MS: Final = 1_000_000
"""Nanoseconds per millisecond: span times are ns, stream ids ms."""

_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")


@dataclass(eq=False)
class _OpenSignal:
    """A signal span started and not yet ended (more Acks may come)."""

    span: Span
    signal_ms: int
    last_ack_ms: int
    acks: int = 0


class SignalTraces:
    """The trace projection of one swarm: Acks in, spans out (see the module docstring)."""

    name = "traces"

    def __init__(self, bus: Views, tracer_provider: trace.TracerProvider, *,
                 settle: float = DEFAULT_SETTLE_S, memory: int = DEFAULT_MEMORY) -> None:
        if memory < 1 or settle < 0:
            raise InvalidInput("memory must be at least 1 and settle not negative")
        self.bus = bus
        self.tracer = tracer_provider.get_tracer(TRACER_NAME, __version__)
        self.settle_ms = round(settle * 1000)
        self.memory = memory
        self._open: OrderedDict[tuple[str, str], _OpenSignal] = OrderedDict()
        self._ended: OrderedDict[tuple[str, str], SpanContext] = OrderedDict()
        self._emitted: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self.spans_emitted = 0

    def __repr__(self) -> str:
        return (f"<SignalTraces open={len(self._open)} ended={len(self._ended)} "
                f"spans_emitted={self.spans_emitted}>")

    def streams(self, keys: SwarmKeys) -> Sequence[str]:
        return [keys.acks]

    async def apply(self, keys: SwarmKeys, stream: str, entry_id: str, event: AnyEvent) -> None:
        if not isinstance(event, Ack) or not _well_formed(event):
            return
        pair = (event.channel, event.stream_id, event.coordinator)
        if pair in self._emitted:
            return
        signal_key = (event.channel, event.stream_id)
        if signal_key not in self._open and signal_key not in self._ended:
            signal = await self._signal(keys, event)
            if signal_key not in self._open:  # still new after the read: start its span
                self._start_signal(keys, event, signal)
        parent = self._account(signal_key, stream_id_ms(entry_id))
        self._deliver(keys, event, entry_id, parent)
        _remember(self._emitted, pair, None, self.memory)

    async def reset(self, keys: SwarmKeys) -> None:
        """Nothing to forget: spans already exported cannot be taken back, so the memory of
        what was emitted survives a rebuild (that is what keeps a replay from doubling them)."""

    def flush(self, now_ms: int | None = None) -> int:
        """End the signal spans settled by ``now_ms`` (server ms), or all with ``None``."""
        settled = [key for key, open_ in self._open.items()
                   if now_ms is None or open_.last_ack_ms + self.settle_ms <= now_ms]
        for key in settled:
            self._end_signal(key)
        return len(settled)

    def close(self) -> None:
        """End every open signal span at its last Ack. Safe to call twice."""
        self.flush(None)

    # -- spans ---------------------------------------------------------------------------------

    async def _signal(self, keys: SwarmKeys, ack: Ack) -> Signal | None:
        """The signal an Ack refers to (for its trace carrier), or ``None`` if it is gone."""
        entry = await self.bus.entry(keys.channel(ack.channel), ack.stream_id)
        if entry is None:
            return None
        try:
            event = decode_fields(entry[1])
        except MalformedEvent:
            return None
        return event if isinstance(event, Signal) else None

    def _start_signal(self, keys: SwarmKeys, ack: Ack, signal: Signal | None) -> None:
        signal_ms = stream_id_ms(ack.stream_id)
        attributes: dict[str, str | int | bool] = {
            "streambus.swarm": keys.swarm, "streambus.channel": ack.channel,
            "streambus.signal_id": ack.signal_id, "streambus.stream_id": ack.stream_id,
        }
        if signal is None:
            attributes["streambus.signal_trimmed"] = True
        elif signal.sender:
            attributes["streambus.sender"] = signal.sender
        span = self.tracer.start_span(
            f"signal {ack.channel}", context=context_from(signal.trace if signal else {}),
            kind=SpanKind.INTERNAL, start_time=signal_ms * _MS, attributes=attributes)
        self._open[(ack.channel, ack.stream_id)] = _OpenSignal(span, signal_ms, signal_ms)
        if len(self._open) > self.memory:  # a flood of signals: end the oldest early
            self._end_signal(next(iter(self._open)))

    def _account(self, key: tuple[str, str], ack_ms: int) -> SpanContext:
        """Count one more Ack of a signal; return the context of its span (open or ended)."""
        open_ = self._open.get(key)
        if open_ is None:
            return self._ended[key]
        open_.acks += 1
        open_.last_ack_ms = max(open_.last_ack_ms, ack_ms)
        return open_.span.get_span_context()

    def _deliver(self, keys: SwarmKeys, ack: Ack, ack_id: str, parent: SpanContext) -> None:
        signal_ms, ack_ms = stream_id_ms(ack.stream_id), stream_id_ms(ack_id)
        span = self.tracer.start_span(
            f"deliver {ack.coordinator}",
            context=trace.set_span_in_context(NonRecordingSpan(parent), Context()),
            kind=SpanKind.CONSUMER, start_time=signal_ms * _MS, attributes={
                "streambus.swarm": keys.swarm, "streambus.channel": ack.channel,
                "streambus.signal_id": ack.signal_id, "streambus.stream_id": ack.stream_id,
                "streambus.coordinator": ack.coordinator, "streambus.iteration": ack.iteration,
                "streambus.ack_id": ack_id, "streambus.latency_ms": ack_ms - signal_ms,
            })
        span.end(end_time=ack_ms * _MS)  # nothing runs between start and end: no try needed
        self.spans_emitted += 1

    def _end_signal(self, key: tuple[str, str]) -> None:
        open_ = self._open.pop(key)
        try:
            open_.span.set_attribute("streambus.acks", open_.acks)
            open_.span.set_attribute("streambus.latency_ms", open_.last_ack_ms - open_.signal_ms)
        finally:
            open_.span.end(end_time=open_.last_ack_ms * _MS)
        self.spans_emitted += 1
        _remember(self._ended, key, open_.span.get_span_context(), self.memory)


def _well_formed(ack: Ack) -> bool:
    """Whether an Ack names a valid channel and stream id (the library only writes such; a
    foreign writer's malformed Ack is skipped rather than stopping the projector)."""
    try:
        validate_id(ack.channel, "channel")
        validate_id(ack.coordinator, "coordinator id")
    except InvalidId:
        log.warning("trace projector: skipping an Ack with invalid ids: %r", ack)
        return False
    if _STREAM_ID.fullmatch(ack.stream_id) is None:
        log.warning("trace projector: skipping an Ack with an invalid stream id: %r", ack)
        return False
    return True


def _remember(memo: OrderedDict[_K, _V], key: _K, value: _V, limit: int) -> None:
    """Remember ``key`` (newest last), forgetting the oldest beyond ``limit``."""
    memo[key] = value
    memo.move_to_end(key)
    while len(memo) > limit:
        memo.popitem(last=False)


def otlp_tracer_provider() -> TracerProvider:
    """A tracer provider exporting over OTLP/HTTP (protobuf), configured by ``OTEL_*``.

    Not installed globally: the projector passes it explicitly, and the caller shuts it down.
    """
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "streambus"}))
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


async def run_traces(
    bus: Bus, swarm: str, *, settle: float = DEFAULT_SETTLE_S,
    tracer_provider: trace.TracerProvider | None = None, lease_ttl: float = DEFAULT_LEASE_TTL_S,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Project ``swarm``'s Acks into spans until cancelled; export them over OTLP/HTTP.

    With ``tracer_provider`` the spans go there instead (and the caller owns its shutdown).
    On the way out, open signal spans are ended and the exporter is flushed. Reports ready
    (``task_status``) once it holds the swarm's ``traces`` lease and has caught up.
    """
    if tracer_provider is not None:
        await _project_under_lease(bus, swarm, settle, tracer_provider, lease_ttl, task_status)
        return
    provider = otlp_tracer_provider()
    try:
        await _project_under_lease(bus, swarm, settle, provider, lease_ttl, task_status)
    finally:
        await _shut_down(provider)


async def _project_under_lease(bus: Bus, swarm: str, settle: float,
                               provider: trace.TracerProvider, lease_ttl: float,
                               task_status: anyio.abc.TaskStatus[None]) -> None:
    """Project while this instance holds the lease; after losing it, stand by again."""
    lease = bus.lease(swarm, "traces", ttl=lease_ttl)
    ready = [task_status]
    while True:
        try:
            await lease.run(lambda: _project(bus, swarm, settle, provider, ready))
        except LeaseLost as exc:
            log.warning("trace projector of swarm %s: %s; standing by", swarm, exc,
                        extra={"swarm": swarm})


async def _project(bus: Bus, swarm: str, settle: float, provider: trace.TracerProvider,
                   ready: list[anyio.abc.TaskStatus[None]]) -> None:
    projection = SignalTraces(bus, provider, settle=settle)
    projector = bus.projector(swarm, projection)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(projector.run)
            tg.start_soon(_flush_settled, bus, projection)
            log.info("trace projector of swarm %s ready", swarm, extra={"swarm": swarm})
            if ready:
                ready.pop().started()
    finally:
        projection.close()


async def _flush_settled(bus: Views, projection: SignalTraces) -> None:
    """End settled signal spans, judged by server time (a stalled swarm still gets them)."""
    interval = min(1.0, max(0.05, projection.settle_ms / 2000))
    while True:
        await anyio.sleep(interval)
        try:
            projection.flush(await bus.server_time_ms())
        except BusUnavailable as exc:
            log.warning("trace projector: %s", exc)


async def _shut_down(provider: TracerProvider) -> None:
    """Export what is buffered, within a time limit.

    The exporter blocks (HTTP, with retries until its own timeout), so the shutdown runs in a
    daemon thread: a collector that does not answer delays the exit by the limit, no more.
    """
    done = threading.Event()

    def shut_down() -> None:
        try:
            provider.shutdown()
        finally:
            done.set()

    threading.Thread(target=shut_down, name="streambus-traces-shutdown", daemon=True).start()
    with anyio.CancelScope(shield=True):
        finished = await anyio.to_thread.run_sync(done.wait, _SHUTDOWN_LIMIT_S)
    if not finished:
        log.warning("trace projector: spans not exported within %.0f s of stopping were dropped",
                    _SHUTDOWN_LIMIT_S)
