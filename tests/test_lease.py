"""Leases: one instance of a job per swarm at a time (the trace projector), others stand by.

Issue 11: the trace projector deduplicates in memory, so two instances on one swarm would each
emit a signal span for a signal whose Acks they split. Now each runs under the swarm's
``traces`` lease: a second instance stands by and takes over when the first stops or dies.
"""

from __future__ import annotations

import functools
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from consumers.traces import run_traces
from streambus import LeaseLost
from streambus.bus import Bus
from streambus.errors import BusUnavailable
from tests.fakes import until
from tests.helpers import until_states

pytestmark = pytest.mark.anyio


def traced() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def delivered(exporter: InMemorySpanExporter, signal_id: str) -> list[str]:
    return [span.name for span in exporter.get_finished_spans()
            if span.name.startswith("deliver")
            and (span.attributes or {}).get("streambus.signal_id") == signal_id]


async def signal_three(bus: Bus, swarm: str) -> str:
    coordinators = ["a", "b", "c"]
    async with anyio.create_task_group() as tg:
        for c in coordinators:
            tg.start_soon(functools.partial(bus.wait_for, swarm, c, "ch", timeout=10))
        await until_states(bus, swarm, dict.fromkeys(coordinators, "waiting"))
        published = await bus.publish(swarm, "ch", None, await_acks=coordinators,
                                      ack_timeout=10)
    return published.signal_id


async def test_a_second_trace_projector_stands_by_and_takes_over(bus: Bus) -> None:
    (first, first_spans), (second, second_spans) = traced(), traced()
    async with anyio.create_task_group() as tg:
        async with anyio.create_task_group() as first_tg:
            await first_tg.start(functools.partial(run_traces, bus, "two", settle=0.05,
                                                   tracer_provider=first, lease_ttl=1.0))
            tg.start_soon(functools.partial(run_traces, bus, "two", settle=0.05,
                                            tracer_provider=second, lease_ttl=1.0))
            one = await signal_three(bus, "two")
            await until(lambda: len(delivered(first_spans, one)) == 3)
            first_tg.cancel_scope.cancel()  # the first stops (and releases its lease)
        two = await signal_three(bus, "two")
        await until(lambda: len(delivered(second_spans, two)) == 3, within=10)
        tg.cancel_scope.cancel()
    assert delivered(second_spans, one) == []  # never emitted twice
    assert delivered(first_spans, two) == []
    signal_spans = [s.name for s in (*first_spans.get_finished_spans(),
                                     *second_spans.get_finished_spans())
                    if s.name.startswith("signal")]
    assert len(signal_spans) == 2, signal_spans


async def test_a_dead_holders_lease_lapses_and_passes_on(bus: Bus) -> None:
    dead, standby = bus.lease("lapse", "job", ttl=0.5), bus.lease("lapse", "job", ttl=0.5)
    await dead.acquire()  # ...and never renews: its process died
    with anyio.fail_after(5):
        await standby.acquire()
    assert standby.held
    await standby.release()


@pytest.mark.parametrize("renewal", ["refused", "hangs"])
async def test_a_holder_that_cannot_renew_stops_its_job_before_the_lease_lapses(
    bus: Bus, monkeypatch: pytest.MonkeyPatch, renewal: str
) -> None:
    """The bus goes away under the holder (its renewals fail at once, or hang as on a cut
    link): it stops its job while its lease still stands, so no standby can be running yet."""
    lease = bus.lease("frozen", "job", ttl=3.0)
    running = anyio.Event()
    stopped: list[bool] = []
    lease_key = bus.keys("frozen").lease("job")

    async def job() -> None:
        running.set()
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):  # the job is being cancelled: look anyway
                stopped.append(await bus._store.raw().exists(lease_key) == 1)

    async def away(*args: Any, **kwargs: Any) -> Any:
        if renewal == "hangs":
            await anyio.sleep_forever()
        raise BusUnavailable("Redis unreachable (scripted)")

    async with anyio.create_task_group() as tg:
        async def hold() -> None:
            with pytest.raises(LeaseLost, match="not renewed"):
                await lease.run(job)

        tg.start_soon(hold)
        await running.wait()
        monkeypatch.setattr(bus._store, "lease", away)
    assert stopped == [True], "the job ran on after its lease lapsed"
    assert not lease.held
