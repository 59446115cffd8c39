"""The Prometheus exporter: a real scrape over HTTP shows the plan's metrics with true values."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import streambus
from consumers.metrics import SwarmEvents, serve
from streambus.bus import Bus
from streambus.errors import WaitTimeout
from streambus.liveness import Heartbeater
from streambus.schema import (
    Ack,
    BlockingEnded,
    BlockingStarted,
    Outcome,
    SignalReceived,
    decode_fields,
    encode,
)
from streambus.store import Limits, Store
from tests.clitools import UNREACHABLE_URL, Cli, finish, one_line_message
from tests.servers import ServerProcess, free_port

pytestmark = pytest.mark.anyio

PLAN_METRICS = ("blocking_coordinators", "blocking_duration_seconds",
                "signal_delivery_latency_seconds", "heartbeat_failures", "timeout_events",
                "dead_letters", "stream_length", "stream_group_pending_entries",
                "stream_group_lag_entries", "channel_pending_entries", "channel_lag_entries_max")


# -- scraping ------------------------------------------------------------------------------------

def get_metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        body: bytes = response.read()
    return body.decode()


class Scrape:
    """One parsed scrape."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels: str) -> float | None:
        found = [s for s in self.samples if s.name == name and _has(s, labels)]
        assert len(found) <= 1, f"{name}{labels} is ambiguous: {found}"
        return found[0].value if found else None


def _has(sample: Sample, labels: dict[str, str]) -> bool:
    return all(sample.labels.get(k) == v for k, v in labels.items())


async def scrape(port: int) -> Scrape:
    return Scrape(await anyio.to_thread.run_sync(get_metrics, port))


async def scrape_until(port: int, ready: Callable[[Scrape], bool], timeout: float = 15.0
                       ) -> Scrape:
    """Scrape (bounded) until ``ready`` holds: the projector applies entries asynchronously."""
    last: Scrape | None = None
    with anyio.move_on_after(timeout):
        while True:
            last = await scrape(port)
            if ready(last):
                return last
            await anyio.sleep(0.05)
    pytest.fail(f"the scrape never got ready; last samples: {last and last.samples}")


@contextlib.asynccontextmanager
async def exporter(bus: Bus, swarms: Sequence[str]) -> AsyncIterator[int]:
    """A running exporter on a free port; yields the port once it caught up."""
    async with anyio.create_task_group() as tg:
        port: int = await tg.start(partial(serve, bus, swarms, host="127.0.0.1", port=0))
        yield port
        tg.cancel_scope.cancel()


async def time_out(bus: Bus, swarm: str, coordinator: str, channel: str, seconds: float) -> None:
    with pytest.raises(WaitTimeout):
        await bus.wait_for(swarm, coordinator, channel, timeout=seconds)


# -- the exporter --------------------------------------------------------------------------------

async def test_a_scrape_shows_the_plans_metrics_with_true_values(bus: Bus) -> None:
    swarm, keys = "m1", bus.keys("m1")
    async with exporter(bus, [swarm]) as port, anyio.create_task_group() as waits:
        # Two waits time out on "slow"; two signals come after, so both their groups lag by 2.
        async with anyio.create_task_group() as tg:
            for name in ("t1", "t2"):
                tg.start_soon(time_out, bus, swarm, name, "slow", 0.2)
        for n in range(2):
            await bus.publish(swarm, "slow", n)
        # Three waits on "go" receive one signal and ACK it.
        async with anyio.create_task_group() as tg:
            for name in ("g1", "g2", "g3"):
                tg.start_soon(partial(bus.wait_for, swarm, name, "go", timeout=30))
            await bus.publish(swarm, "go", "now", await_acks=["g1", "g2", "g3"])
        # Two are left waiting on "later".
        for name in ("w1", "w2"):
            waits.start_soon(partial(bus.wait_for, swarm, name, "later", timeout=60))
        # A poison entry on the lifecycle stream: the metrics projector dead-letters it.
        await bus._store.raw().xadd(keys.events, {"e": b"not json"})
        # Two heartbeats fail (nothing listens there), then one gets through and reports them.
        unreachable = Store(UNREACHABLE_URL, limits=Limits())
        beater = Heartbeater(unreachable, keys, "hb-1", interval=1.0)
        await beater.beat_once()
        await beater.beat_once()
        assert (beater.failures, beater.beats) == (2, 0)
        await unreachable.aclose()
        beater.store = bus._store
        await beater.beat_once()
        assert (beater.failures, beater.beats, beater.unreported) == (2, 1, 0)

        got = await scrape_until(port, lambda s: (
            s.value("blocking_coordinators", swarm=swarm, state="waiting") == 2
            and s.value("signal_delivery_latency_seconds_count", swarm=swarm) == 3
            and s.value("timeout_events_total", swarm=swarm) == 2
            and s.value("dead_letters_total", swarm=swarm) == 1
            and s.value("stream_group_pending_entries", swarm=swarm, stream="events",
                        group="proj.metrics") == 0))
        events = len(await bus._store.read_range(keys.events, count=10_000))
        waits.cancel_scope.cancel()

    assert set(PLAN_METRICS) <= set(got.families)
    assert got.families["blocking_duration_seconds"].type == "histogram"
    assert got.families["timeout_events"].type == "counter"
    by_state = {s.labels["state"]: s.value for s in got.families["blocking_coordinators"].samples}
    assert by_state == {"waiting": 2, "signaled": 3, "timed_out": 2, "peer_dead": 0,
                        "cancelled": 0, "bus_unavailable": 0, "failed": 0}

    duration = partial(got.value, swarm=swarm)
    assert duration("blocking_duration_seconds_count", outcome="timeout") == 2
    assert duration("blocking_duration_seconds_bucket", outcome="timeout", le="0.1") == 0
    assert 0.38 <= (duration("blocking_duration_seconds_sum", outcome="timeout") or 0) < 20
    assert duration("blocking_duration_seconds_count", outcome="signaled") == 3
    assert duration("blocking_duration_seconds_count", outcome="cancelled") is None
    assert got.value("signal_delivery_latency_seconds_count", swarm=swarm, channel="go") == 3
    assert 0 <= (got.value("signal_delivery_latency_seconds_sum", swarm=swarm) or -1) < 15
    assert got.value("timeout_events_total", swarm=swarm) == 2
    assert got.value("heartbeat_failures_total", swarm=swarm) == 2
    assert got.value("dead_letters_total", swarm=swarm) == 1
    assert got.value("bus_up", swarm=swarm) == 1

    # started+ended (timeouts), started+ended (signaled: the receipt is in its end), started,
    # poison
    assert events == 2 * 2 + 3 * 2 + 2 + 1
    length = partial(got.value, "stream_length", swarm=swarm)
    assert length(stream="events") == events
    assert length(stream="acks") == 3
    assert length(stream="dead") == 1
    assert length(stream="hb") == 1
    assert (length(stream="ch:go"), length(stream="ch:slow"), length(stream="ch:later")) == (
        1, 2, 0)
    for stream in ("events", "acks"):
        assert got.value("stream_group_lag_entries", swarm=swarm, stream=stream,
                         group="proj.metrics") == 0
    assert got.value("channel_lag_entries_max", swarm=swarm, channel="slow") == 2
    assert got.value("channel_lag_entries_max", swarm=swarm, channel="go") == 0
    for channel in ("slow", "go", "later"):
        assert got.value("channel_pending_entries", swarm=swarm, channel=channel) == 0


async def test_events_of_a_newer_writer_are_counted_as_unknown(bus: Bus) -> None:
    """An event type this version does not know is skipped, acknowledged and counted."""
    swarm = "m-unknown"
    await bus._store.raw().xadd(bus.keys(swarm).channel("ch"), {
        "e": b'{"type":"teleport","v":1,"coordinator":"c"}'})
    published = await bus.publish(swarm, "ch", "after it")
    got = await bus.wait_for(swarm, "c", "ch", timeout=10)
    assert got.signal.signal_id == published.signal_id
    async with exporter(bus, [swarm]) as port:
        scraped = await scrape(port)
    assert scraped.value("unknown_events_total", swarm=swarm) == 1


async def test_a_restarted_exporter_counts_only_what_it_had_not_counted(bus: Bus) -> None:
    swarm = "m2"
    async with exporter(bus, [swarm]) as port:
        await time_out(bus, swarm, "a", "ch", 0.05)
        await scrape_until(port, lambda s: s.value("timeout_events_total", swarm=swarm) == 1)
    await time_out(bus, swarm, "b", "ch", 0.05)
    await time_out(bus, swarm, "c", "ch", 0.05)
    async with exporter(bus, [swarm]) as port:
        # Ready means caught up: the first scrape already holds exactly the two new timeouts.
        got = await scrape(port)
    assert got.value("timeout_events_total", swarm=swarm) == 2
    assert got.value("blocking_duration_seconds_count", swarm=swarm, outcome="timeout") == 2
    assert got.value("blocking_coordinators", swarm=swarm, state="timed_out") == 3


async def test_without_a_swarm_named_every_swarm_is_exported(bus: Bus) -> None:
    await time_out(bus, "found-1", "a", "ch", 0.05)
    await time_out(bus, "found-2", "a", "ch", 0.05)
    async with exporter(bus, []) as port:
        got = await scrape(port)
    for swarm in ("found-1", "found-2"):
        assert got.value("timeout_events_total", swarm=swarm) == 1
        assert got.value("blocking_coordinators", swarm=swarm, state="timed_out") == 1


async def test_with_the_bus_down_a_scrape_still_answers_and_says_so(
    own_server: ServerProcess, namespace: str
) -> None:
    async with streambus.connect(own_server.url, namespace=namespace) as bus:
        await time_out(bus, "down", "a", "ch", 0.05)
        async with exporter(bus, ["down"]) as port:
            own_server.kill()
            got = await scrape(port)
    assert got.value("bus_up", swarm="down") == 0
    assert got.value("timeout_events_total", swarm="down") == 1  # projected: still there
    assert got.value("blocking_coordinators", swarm="down", state="timed_out") is None


# -- what the metrics rest on ----------------------------------------------------------------------

async def test_the_census_counts_every_coordinator_across_script_chunks(bus: Bus) -> None:
    keys = bus.keys("census")
    for n in range(600):
        await bus._store.begin_wait(keys, f"c{n}", "ab"[n % 2], 60_000, 0)
    ended = BlockingEnded(coordinator="c0", channel="a", iteration=1, outcome=Outcome.TIMEOUT)
    assert await bus._store.end_wait(keys, "c0", "a", 1, "timed_out", encode(ended))
    await bus._store.raw().delete(keys.state("c1"))  # expired: listed, but not counted
    assert await bus._store.coordinator_census(keys) == {
        ("waiting", "a"): 299, ("timed_out", "a"): 1, ("waiting", "b"): 299}
    assert await bus._store.coordinator_census(bus.keys("nobody")) == {}


async def test_the_events_that_end_a_wait_carry_its_start(bus: Bus) -> None:
    swarm, keys = "starts", bus.keys("starts")
    await time_out(bus, swarm, "t", "ch", 0.05)
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(bus.wait_for, swarm, "s", "go", timeout=30))
        await bus.publish(swarm, "go", await_acks=["s"])
    # A wait resumed after a crash keeps its start: begin it, then wait again as a restart would.
    first = await bus._store.begin_wait(keys, "r", "ch", 300, 0)
    await time_out(bus, swarm, "r", "ch", 30)
    events = [decode_fields(fields) for _, fields in await bus._store.read_range(keys.events)]
    started = {e.coordinator: e.started_ms for e in events if isinstance(e, BlockingStarted)}
    assert started["r"] == first.started_ms == first.now_ms
    ends = [e for e in events if isinstance(e, BlockingEnded | SignalReceived)]
    assert sorted(e.coordinator for e in ends) == ["r", "s", "t"]  # one end per wait
    for event in ends:
        assert event.started_ms == started[event.coordinator] > 0


async def test_the_projection_counts_an_entry_once_and_times_old_events_by_their_start(
    bus: Bus
) -> None:
    keys = bus.keys("unit")
    view = SwarmEvents("unit")
    start = BlockingStarted(coordinator="c", channel="ch", iteration=1, started_ms=1_000,
                            deadline_ms=9_000)
    old_end = BlockingEnded(coordinator="c", channel="ch", iteration=1, outcome=Outcome.TIMEOUT)
    ack = Ack(coordinator="c", signal_id="s", channel="ch", stream_id="4000-0", iteration=1)
    await view.apply(keys, keys.events, "1000-0", start)
    for _ in range(2):  # a batch re-read after a failed ACK
        await view.apply(keys, keys.events, "3500-0", old_end)
        await view.apply(keys, keys.acks, "4250-0", ack)
    assert view.timeouts == 1
    assert view.durations[Outcome.TIMEOUT].total == 2.5
    assert sum(view.durations[Outcome.TIMEOUT].counts) == 1
    assert view.latencies["ch"].total == 0.25
    await view.reset(keys)
    assert (view.timeouts, view.durations, view.latencies) == (0, {}, {})


# -- the command ---------------------------------------------------------------------------------

def fetch_when_up(port: int, process: subprocess.Popen[str], timeout: float = 20.0) -> str:
    """GET /metrics (bounded) until the exporter answers."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            code, out, err = finish(process)
            pytest.fail(f"the exporter exited {code}: {out!r} {err!r}")
        try:
            return get_metrics(port)
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_the_metrics_command_serves_until_sigterm_then_exits_0(
    cli: Cli, bus_args: list[str]
) -> None:
    waited = cli.run("wait", "cli-m", "coord", "ch", "--timeout", "50ms", *bus_args)
    assert waited.returncode == 2, waited.stderr
    port = free_port()
    exporter = cli.start("metrics", "--port", str(port), "--swarm", "cli-m", *bus_args)
    got = Scrape(fetch_when_up(port, exporter))
    assert exporter.poll() is None
    assert got.value("timeout_events_total", swarm="cli-m") == 1
    assert got.value("blocking_coordinators", swarm="cli-m", state="timed_out") == 1
    exporter.send_signal(signal.SIGTERM)
    code, out, err = finish(exporter)
    assert code == 0, err
    assert out == ""
    assert "Traceback" not in err


def test_the_metrics_command_rejects_a_bad_swarm_and_a_busy_port(
    cli: Cli, bus_args: list[str]
) -> None:
    bad = cli.run("metrics", "--swarm", "no good", *bus_args)
    assert bad.returncode == 64
    assert "swarm" in one_line_message(bad.stderr)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = cli.run("metrics", "--port", str(taken.getsockname()[1]), "--swarm", "x",
                       *bus_args)
    assert busy.returncode == 1
    assert "cannot serve metrics" in one_line_message(busy.stderr)
