"""Traces of the signal path: the carrier in the signal, the trace projector, OTLP export."""

from __future__ import annotations

import functools
import signal
import subprocess
import sys
from collections.abc import Iterator

import anyio
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from consumers.traces import SignalTraces, run_traces
from streambus.bus import Bus, Delivery, Published
from streambus.projection import Projector
from streambus.schema import Ack, Signal, decode_fields, encode, stream_id_ms
from streambus.tracing import context_from, trace_id_of
from tests.clitools import Cli, finish
from tests.helpers import until_states
from tests.otlp import OtlpCollector

pytestmark = pytest.mark.anyio

MS = 1_000_000


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    """A provider of the test's own: nothing here installs a global one."""
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


@pytest.fixture
def collector() -> Iterator[OtlpCollector]:
    collector = OtlpCollector().start()
    yield collector
    collector.stop()


async def signal_entry(bus: Bus, swarm: str, channel: str, stream_id: str) -> Signal:
    entry = await bus._store.entry(bus.keys(swarm).channel(channel), stream_id)
    assert entry is not None
    event = decode_fields(entry[1])
    assert isinstance(event, Signal)
    return event


async def publish_to_waiters(
    bus: Bus, swarm: str, coordinators: list[str], tracer: trace.Tracer | None,
) -> tuple[Published, dict[str, Delivery], trace.SpanContext | None]:
    """Coordinators block on ``ch``; a validator publishes (inside a span, given a tracer)
    and waits for their ACKs. Returns the publish, each delivery, the publisher's span."""
    deliveries: dict[str, Delivery] = {}

    async def wait(coordinator: str) -> None:
        deliveries[coordinator] = await bus.wait_for(swarm, coordinator, "ch", timeout=10)

    async with anyio.create_task_group() as tg:
        for coordinator in coordinators:
            tg.start_soon(wait, coordinator)
        await until_states(bus, swarm, dict.fromkeys(coordinators, "waiting"))
        if tracer is None:
            published = await bus.publish(swarm, "ch", {"n": 1}, sender="validator-1",
                                          await_acks=coordinators, ack_timeout=10)
            return published, deliveries, None
        with tracer.start_as_current_span("validate") as span:
            published = await bus.publish(swarm, "ch", {"n": 1}, sender="validator-1",
                                          await_acks=coordinators, ack_timeout=10)
    return published, deliveries, span.get_span_context()


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    named = {span.name: span for span in spans}
    assert len(named) == len(spans), f"duplicate spans: {[s.name for s in spans]}"
    return named


# -- the carrier ---------------------------------------------------------------------------------


async def test_publish_carries_the_current_span_context(bus: Bus, provider: TracerProvider
                                                        ) -> None:
    tracer = provider.get_tracer("test")
    untraced = await bus.publish("carrier", "ch", 0)
    with tracer.start_as_current_span("validate") as span:
        traced = await bus.publish("carrier", "ch", 1)
        opted_out = await bus.publish("carrier", "ch", 2, trace={})
    explicit = await bus.publish("carrier", "ch", 3, trace={"traceparent": "00-" + "ab" * 16
                                                             + "-" + "cd" * 8 + "-01"})
    context = span.get_span_context()
    assert (await signal_entry(bus, "carrier", "ch", untraced.stream_id)).trace == {}
    carrier = (await signal_entry(bus, "carrier", "ch", traced.stream_id)).trace
    version, trace_id, span_id, _flags = carrier["traceparent"].split("-")
    assert (version, trace_id, span_id) == (
        "00", trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id))
    assert (await signal_entry(bus, "carrier", "ch", opted_out.stream_id)).trace == {}
    assert (await signal_entry(bus, "carrier", "ch", explicit.stream_id)).trace == {
        "traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"}
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


# -- the projector -------------------------------------------------------------------------------


async def test_spans_of_publish_delivery_and_ack_in_server_time(
    bus: Bus, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    published, deliveries, publisher = await publish_to_waiters(
        bus, "traced", ["coord-a", "coord-b"], provider.get_tracer("test"))
    assert publisher is not None
    projection = SignalTraces(bus, provider, settle=3600)
    projector = Projector(bus._store, bus.keys("traced"), projection)
    assert await projector.catch_up() == 2

    # Deliver spans are exported at once; the signal span waits for its ACKs to settle.
    assert set(by_name(exporter.get_finished_spans())) == {
        "validate", "deliver coord-a", "deliver coord-b"}
    assert projection.flush() == 1
    spans = by_name(exporter.get_finished_spans())
    signal_span = spans["signal ch"]
    signal_ns = stream_id_ms(published.stream_id) * MS
    last_ack_ms = max(stream_id_ms(d.ack_id) for d in deliveries.values())

    # The signal span is a child of the publisher's span, in the publisher's trace.
    assert signal_span.context is not None
    assert signal_span.parent is not None
    assert signal_span.context.trace_id == publisher.trace_id
    assert signal_span.parent.span_id == publisher.span_id
    assert (signal_span.start_time, signal_span.end_time) == (signal_ns, last_ack_ms * MS)
    assert dict(signal_span.attributes or {}) == {
        "streambus.swarm": "traced", "streambus.channel": "ch",
        "streambus.signal_id": published.signal_id, "streambus.stream_id": published.stream_id,
        "streambus.sender": "validator-1", "streambus.acks": 2,
        "streambus.latency_ms": last_ack_ms - stream_id_ms(published.stream_id),
    }
    for coordinator, delivery in deliveries.items():
        span = spans[f"deliver {coordinator}"]
        assert span.context is not None
        assert span.parent is not None
        assert span.context.trace_id == publisher.trace_id
        assert span.parent.span_id == signal_span.context.span_id
        assert (span.start_time, span.end_time) == (signal_ns, stream_id_ms(delivery.ack_id) * MS)
        attributes = dict(span.attributes or {})
        assert attributes["streambus.coordinator"] == coordinator
        assert attributes["streambus.iteration"] == delivery.iteration
        assert attributes["streambus.latency_ms"] == delivery.latency_ms
        assert attributes["streambus.ack_id"] == delivery.ack_id
        assert attributes["streambus.signal_id"] == published.signal_id

    # Replays emit nothing: the same position again, then a rebuild from the start.
    assert await projector.catch_up() == 0
    assert await projector.rebuild() == 2
    assert projection.flush() == 0
    assert len(exporter.get_finished_spans()) == 4

    # A coordinator that waits later still gets the signal: one more deliver span, under the
    # (already ended) signal span, and no second signal span.
    late = await bus.wait_for("traced", "coord-late", "ch", timeout=10)
    assert await projector.catch_up() == 1
    assert projection.flush() == 0
    spans = by_name(exporter.get_finished_spans())
    assert len(spans) == 5
    late_span = spans["deliver coord-late"]
    assert late_span.parent is not None
    assert late_span.parent.span_id == signal_span.context.span_id
    assert late_span.end_time == stream_id_ms(late.ack_id) * MS


async def test_signal_span_ends_once_acks_settle_in_server_time(
    bus: Bus, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    _, deliveries, _ = await publish_to_waiters(bus, "settle", ["a"], None)
    projection = SignalTraces(bus, provider, settle=5)
    await Projector(bus._store, bus.keys("settle"), projection).catch_up()
    ack_ms = stream_id_ms(deliveries["a"].ack_id)
    assert projection.flush(ack_ms + 4999) == 0
    assert projection.flush(ack_ms + 5000) == 1
    # Without a carrier the signal span starts a trace of its own, and is its root.
    spans = by_name(exporter.get_finished_spans())
    assert spans["signal ch"].parent is None
    assert spans["deliver a"].parent is not None
    assert spans["deliver a"].parent.span_id == spans["signal ch"].context.span_id


async def test_trimmed_signal_still_gets_its_spans(
    bus: Bus, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    published, _, _ = await publish_to_waiters(bus, "trimmed", ["a"], provider.get_tracer("t"))
    await bus._store.raw().xdel(bus.keys("trimmed").channel("ch"), published.stream_id)
    projection = SignalTraces(bus, provider)
    await Projector(bus._store, bus.keys("trimmed"), projection).catch_up()
    projection.close()
    projection.close()  # safe twice
    spans = by_name(exporter.get_finished_spans())
    assert spans["signal ch"].attributes is not None
    assert spans["signal ch"].attributes["streambus.signal_trimmed"] is True
    assert spans["signal ch"].parent is None  # the carrier went with the entry


async def test_malformed_ack_is_skipped_and_the_projector_goes_on(
    bus: Bus, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    keys = bus.keys("foreign")
    for bad in (Ack(coordinator="a", signal_id="s", channel="no such{channel}",
                    stream_id="1-0", iteration=1),
                Ack(coordinator="a", signal_id="s", channel="ch", stream_id="zzz", iteration=1)):
        await bus._store.raw().xadd(keys.acks, {"e": encode(bad)})
    await publish_to_waiters(bus, "foreign", ["a"], None)
    projection = SignalTraces(bus, provider)
    assert await Projector(bus._store, keys, projection).catch_up() == 3
    projection.close()
    assert set(by_name(exporter.get_finished_spans())) == {"signal ch", "deliver a"}


# -- OTLP over HTTP ------------------------------------------------------------------------------


async def test_run_traces_exports_over_otlp_http(
    bus: Bus, provider: TracerProvider, collector: OtlpCollector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{collector.url}/v1/traces")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "streambus-test")
    published, deliveries, publisher = await publish_to_waiters(
        bus, "otlp", ["coord-a", "coord-b"], provider.get_tracer("test"))
    assert publisher is not None
    async with anyio.create_task_group() as tg:
        await tg.start(functools.partial(run_traces, bus, "otlp", settle=0.05))
        await collector.until_names({"signal ch", "deliver coord-a", "deliver coord-b"})
        tg.cancel_scope.cancel()

    assert set(collector.paths) == {"/v1/traces"}
    spans = {span.name: span for span in collector.spans()}
    assert len(spans) == len(collector.spans()) == 3
    signal_span = spans["signal ch"]
    trace_id = trace.format_trace_id(publisher.trace_id)
    assert signal_span.trace_id == trace_id
    assert signal_span.parent_span_id == trace.format_span_id(publisher.span_id)
    assert signal_span.resource["service.name"] == "streambus-test"
    assert signal_span.scope == "streambus.traces"
    assert signal_span.start_ns == stream_id_ms(published.stream_id) * MS
    for coordinator, delivery in deliveries.items():
        span = spans[f"deliver {coordinator}"]
        assert (span.trace_id, span.parent_span_id) == (trace_id, signal_span.span_id)
        assert span.end_ns == stream_id_ms(delivery.ack_id) * MS
        assert span.attributes["streambus.coordinator"] == coordinator
        assert span.attributes["streambus.latency_ms"] == delivery.latency_ms
        assert span.attributes["streambus.swarm"] == "otlp"
    # The projector used a provider of its own; the global one was never set.
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


async def test_cli_traces_exports_and_exits_0_on_sigterm(
    bus: Bus, bus_args: list[str], cli: Cli, collector: OtlpCollector
) -> None:
    await publish_to_waiters(bus, "cli", ["a"], None)
    process = cli.start("traces", "cli", "--settle", "1h", *bus_args, env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "20"})
    await collector.until_names({"deliver a"})
    assert "signal ch" not in collector.names()  # open until its ACKs settle, or until...
    process.send_signal(signal.SIGTERM)
    code, out, err = finish(process)
    assert (code, out) == (0, ""), err
    assert "Traceback" not in err
    assert "signal ch" in collector.names()  # ...the projector stops: ended and flushed
    assert [span.resource["service.name"] for span in collector.spans()] == ["streambus"] * 2


@pytest.mark.parametrize("traceparent", [
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00 ",
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
    "garbage", "",
])
def test_a_traceparent_is_read_without_opentelemetry_as_its_propagator_reads_it(
    traceparent: str
) -> None:
    """``trace_id_of`` reads a W3C traceparent itself (a waiter need not load OpenTelemetry to
    log a signal's trace id), with the default propagator's verdict on every form."""
    carrier = {"traceparent": traceparent}
    context = trace.get_current_span(context_from(carrier)).get_span_context()
    expected = trace.format_trace_id(context.trace_id) if context.is_valid else ""
    assert trace_id_of(carrier) == expected


def test_without_the_opentelemetry_api_loaded_nothing_loads_it() -> None:
    """A process that never imported OpenTelemetry publishes and logs without importing it."""
    code = ("import sys, streambus.tracing as t; assert t.current_carrier() == {}; "
            "assert t.current_trace_id() == ''; "
            "assert t.trace_id_of({'traceparent': '00-' + '1' * 32 + '-' + '2' * 16 + '-01'}); "
            "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'loaded'")
    subprocess.run([sys.executable, "-c", code], check=True)
