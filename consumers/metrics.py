"""The Prometheus exporter: ``streambus metrics [--host H] [--port N] [--swarm S ...]``.

Two kinds of metrics, both served from one ``prometheus_client`` registry at ``/metrics``:

* **Read at scrape time** from Redis, so they are the truth of the moment whichever process
  wrote it: ``blocking_coordinators`` (every coordinator's blocking-state hash, counted by
  state: two round trips for any number of coordinators), the swarm's ``counters`` hash
  (``dead_letters``, ``heartbeat_failures``), the length, pending entries and lag of the
  swarm's streams (``XLEN``, ``XINFO GROUPS``), and the waits past their deadline and the
  coordinators reported dead (:mod:`consumers.lapses`).
* **Projected** from the lifecycle and ACK streams by a :class:`~streambus.projection.Projector`
  (group ``proj.metrics``, one consumer per exporter process): ``blocking_duration_seconds``,
  ``signal_delivery_latency_seconds``, ``timeout_events_total``, ``coordinator_dead_events_total``.
  Durations and latencies are differences of server times (stream ids and the ``started_ms``
  the events carry), so no clock skew reaches them. These are counts since the exporter
  started, as Prometheus expects of counters; the group's position is in Redis, so a restarted
  exporter resumes after the last entry it applied and never counts an entry twice, and a new
  exporter deployment (a fresh group) counts the retained history once, on its first start.
  Several exporters of one namespace share the group and so split the entries between them:
  aggregate with ``sum()`` across instances.

``prometheus_client`` serves from a thread of its own; a scrape hops onto the event loop
(``anyio.from_thread.run``) to read Redis and the projected state, so no lock is needed and the
loop never blocks on HTTP.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from typing import Final

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from consumers.lapses import lapse_families, read_lapses
from streambus.backoff import keep_running
from streambus.bus import Bus
from streambus.errors import BusUnavailable, InvalidId, StreambusError
from streambus.keys import SwarmKeys, validate_id
from streambus.schema import (
    Ack,
    AnyEvent,
    BlockingEnded,
    BlockingStarted,
    BlockingState,
    CoordinatorDead,
    Outcome,
    stream_id_ms,
)
from streambus.store import GroupMissing, StreamInfo

log = logging.getLogger(__name__)

DEFAULT_PORT: Final = 9109
DURATION_BUCKETS: Final = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                           600.0, 1800.0, 3600.0, 7200.0)
LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                          5.0, 10.0, 30.0, 60.0, 300.0)
SCRAPE_TIMEOUT_S: Final = 5.0
DISCOVER_INTERVAL_S: Final = 60.0
_RECENT_IDS: Final = 4096
"""Entry ids remembered per stream: a batch re-read after a failed ACK is not counted twice."""
_OPEN_WAITS: Final = 100_000
_CHANNELS: Final = 1024
"""Channel streams inspected per swarm at most (their groups are read on every scrape)."""


class _Histogram:
    """Bucket counts, a sum and a count; exported as a ``HistogramMetricFamily`` sample."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def add_to(self, family: HistogramMetricFamily, labels: list[str]) -> None:
        cumulative, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            cumulative.append((_le(bound), float(running)))
        family.add_metric(labels, cumulative, self.total)


def _le(bound: float) -> str:
    """A bucket bound as ``prometheus_client`` writes ``le`` labels (``0.5``, ``+Inf``)."""
    return str(floatToGoString(bound))  # type: ignore[no-untyped-call]


class _Recent:
    """A bounded set: the last ``size`` items added."""

    def __init__(self, size: int) -> None:
        self._order: deque[str] = deque()
        self._items: set[str] = set()
        self._size = size

    def add(self, item: str) -> bool:
        """Add ``item``; False if it was already there."""
        if item in self._items:
            return False
        self._items.add(item)
        self._order.append(item)
        if len(self._order) > self._size:
            self._items.discard(self._order.popleft())
        return True


class SwarmEvents:
    """The projection: metrics of one swarm built from its ``events`` and ``acks`` streams.

    ``apply`` is idempotent per entry id (the last few thousand per stream are remembered).
    A ``BlockingEnded`` that carries no ``started_ms`` (written before the field existed) is
    timed from the ``BlockingStarted`` of the same wait, if this projector applied it.
    """

    name = "metrics"

    def __init__(self, swarm: str) -> None:
        self.swarm = swarm
        self._clear()

    def _clear(self) -> None:
        self.durations: dict[str, _Histogram] = {}
        self.latencies: dict[str, _Histogram] = {}
        self.timeouts = 0
        self.dead_reported = 0
        self.channels: set[str] = set()
        self._open: OrderedDict[tuple[str, str, int], int] = OrderedDict()
        self._seen: dict[str, _Recent] = {}

    def __repr__(self) -> str:
        ended = sum(sum(h.counts) for h in self.durations.values())
        acks = sum(sum(h.counts) for h in self.latencies.values())
        return f"<SwarmEvents {self.swarm!r} ended={ended} acks={acks}>"

    def streams(self, keys: SwarmKeys) -> Sequence[str]:
        return [keys.events, keys.acks]

    async def apply(self, keys: SwarmKeys, stream: str, entry_id: str, event: AnyEvent) -> None:
        if not self._seen.setdefault(stream, _Recent(_RECENT_IDS)).add(entry_id):
            return
        if isinstance(event, BlockingStarted):
            self.remember_channel(event.channel)
            self._open[(event.coordinator, event.channel, event.iteration)] = event.started_ms
            while len(self._open) > _OPEN_WAITS:
                self._open.popitem(last=False)
        elif isinstance(event, BlockingEnded):
            started = self._open.pop((event.coordinator, event.channel, event.iteration), 0)
            started = event.started_ms or started
            if started:
                seconds = max(0, stream_id_ms(entry_id) - started) / 1000
                self.durations.setdefault(event.outcome, _Histogram(DURATION_BUCKETS)
                                          ).observe(seconds)
            if event.outcome == Outcome.TIMEOUT:
                self.timeouts += 1
        elif isinstance(event, Ack):
            self.remember_channel(event.channel)
            seconds = max(0, stream_id_ms(entry_id) - stream_id_ms(event.stream_id)) / 1000
            self.latencies.setdefault(event.channel, _Histogram(LATENCY_BUCKETS)).observe(seconds)
        elif isinstance(event, CoordinatorDead):
            self.dead_reported += 1

    async def reset(self, keys: SwarmKeys) -> None:
        self._clear()

    def remember_channel(self, channel: str) -> None:
        """Inspect this channel's stream at each scrape (up to a bound; valid ids only)."""
        with contextlib.suppress(InvalidId):  # a name streambus did not write
            if len(self.channels) < _CHANNELS:
                self.channels.add(validate_id(channel, "channel"))


class Exporter(Collector):
    """Metrics of some swarms (or of every swarm found, when none is named).

    A ``prometheus_client`` collector: :attr:`registry` holds it. :meth:`collect` is called by
    the HTTP server's thread and runs :meth:`families` on the event loop.
    """

    def __init__(self, bus: Bus, swarms: Sequence[str] = (), *,
                 scrape_timeout: float = SCRAPE_TIMEOUT_S, block_ms: int = 1000) -> None:
        self.bus = bus
        self.named = [bus.keys(swarm).swarm for swarm in dict.fromkeys(swarms)]
        self.scrape_timeout = scrape_timeout
        self.block_ms = block_ms
        self.projections: dict[str, SwarmEvents] = {}
        self._scanned: set[str] = set()
        self._token: anyio.lowlevel.EventLoopToken | None = None
        self._loop_thread: int | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def __repr__(self) -> str:
        return f"<Exporter swarms={sorted(self.projections)}>"

    def describe(self) -> Iterable[Metric]:
        return []  # so that registering does not scrape

    def collect(self) -> Iterable[Metric]:
        """Scrape (called from a thread other than the event loop's, e.g. the HTTP server's)."""
        if self._token is None:
            raise RuntimeError("the exporter is not running")
        if threading.get_ident() == self._loop_thread:
            raise RuntimeError("collect() blocks: on the event loop, await families() instead")
        return anyio.from_thread.run(self.families, token=self._token)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Project every swarm until cancelled; ready once each caught up with its history.

        With no swarm named, every swarm with a coordinator index is found at start and again
        every minute.
        """
        self._token = anyio.lowlevel.current_token()
        self._loop_thread = threading.get_ident()
        async with anyio.create_task_group() as tg:
            for swarm in self.named or await self._discover():
                await tg.start(self._project, swarm)
            task_status.started()
            while not self.named:
                await anyio.sleep(DISCOVER_INTERVAL_S)
                try:
                    for swarm in set(await self._discover()) - self.projections.keys():
                        await tg.start(self._project, swarm)
                except BusUnavailable as exc:
                    log.warning("metrics: cannot look for new swarms: %s", exc)

    async def _discover(self) -> list[str]:
        return await self.bus.swarm_ids()

    async def _project(self, swarm: str, *,
                       task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                       ) -> None:
        projection = SwarmEvents(swarm)
        projector = self.bus.projector(swarm, projection, block_ms=self.block_ms)
        await projector.catch_up()
        self.projections[swarm] = projection
        task_status.started()
        # ``run`` retries outages only once it follows the streams, and a group the server
        # lost (a restart without AOF) ends it: start it again, which recreates the group.
        await keep_running(projector.run, retry_on=(BusUnavailable, GroupMissing),
                           on_unavailable=lambda exc: log.warning(
                               "metrics projector of %s: %s; starting it again", swarm, exc))

    async def families(self) -> list[Metric]:
        """Every metric, read now (Redis) and from the projections."""
        f = _Families()
        for swarm, projection in list(self.projections.items()):
            f.add_projected(projection)
            read = _Families()  # all or nothing: a scrape cut short adds none of it
            try:
                with anyio.fail_after(self.scrape_timeout):
                    await self._read_bus(read, self.bus.keys(swarm), projection)
            except (BusUnavailable, TimeoutError) as exc:
                log.warning("metrics: cannot read swarm %s: %s", swarm, exc)
                f.up.add_metric([swarm], 0)
            else:
                f.merge(read)
                f.up.add_metric([swarm], 1)
        return f.all()

    async def _read_bus(self, f: _Families, keys: SwarmKeys, projection: SwarmEvents) -> None:
        bus, swarm = self.bus, keys.swarm
        census = await bus.census(swarm)
        by_state = dict.fromkeys([str(s) for s in BlockingState], 0)
        for (state, channel), count in census.items():
            by_state[state] = by_state.get(state, 0) + count
            if channel:
                projection.remember_channel(channel)
        for state, count in sorted(by_state.items()):
            f.coordinators.add_metric([swarm, state], count)
        if swarm not in self._scanned:  # channels nobody waited on since: found once, by SCAN
            for channel in await bus.channels(swarm):
                projection.remember_channel(channel)
            self._scanned.add(swarm)
        shared = [keys.events, keys.acks, keys.heartbeats, keys.dead_letters]
        channels = {keys.channel(c): c for c in sorted(projection.channels)}
        info = await bus.stream_info([*shared, *channels])
        counters = await bus.counters(swarm)
        f.dead_letters.add_metric([swarm], int(counters.get("dead_letters", 0)))
        f.heartbeat_failures.add_metric([swarm], int(counters.get("heartbeat_failures", 0)))
        f.unknown_events.add_metric([swarm], int(counters.get("unknown_events", 0)))
        (await read_lapses(bus, swarm)).add_to(swarm, f)  # past deadline, reported dead
        for stream, stats in info.items():
            name = stream[len(keys.prefix) + 1:]
            f.length.add_metric([swarm, name], stats.length)
            if stream in channels:
                f.add_channel(swarm, channels[stream], stats)
            else:
                for group in stats.groups:
                    f.group_pending.add_metric([swarm, name, group.name], group.pending)
                    if group.lag is not None:
                        f.group_lag.add_metric([swarm, name, group.name], group.lag)


class _Families:
    """The metric families of one scrape."""

    def __init__(self) -> None:
        s = ["swarm"]
        self.coordinators = GaugeMetricFamily(
            "blocking_coordinators", "Coordinators by recorded blocking state.",
            labels=[*s, "state"])
        self.durations = HistogramMetricFamily(
            "blocking_duration_seconds", "How long blocking waits lasted (start to end, server "
            "time), by outcome.", labels=[*s, "outcome"])
        self.latencies = HistogramMetricFamily(
            "signal_delivery_latency_seconds", "Signal publish to a coordinator's ACK (stream "
            "ids, server time), by channel.", labels=[*s, "channel"])
        self.timeouts = CounterMetricFamily(
            "timeout_events", "Blocking waits that ended at their deadline.", labels=s)
        self.dead_reported = CounterMetricFamily(
            "coordinator_dead_events", "Coordinators a watchdog reported dead.", labels=s)
        self.heartbeat_failures = CounterMetricFamily(
            "heartbeat_failures", "Heartbeats that failed (counted by the coordinator's next "
            "successful beat).", labels=s)
        self.dead_letters = CounterMetricFamily(
            "dead_letters", "Poison entries moved to the dead-letter stream.", labels=s)
        self.unknown_events = CounterMetricFamily(
            "unknown_events", "Entries of event types this version does not know (a newer "
            "writer's), skipped and acknowledged.", labels=s)
        self.length = GaugeMetricFamily(
            "stream_length", "Entries in a stream of the swarm (XLEN).", labels=[*s, "stream"])
        self.group_pending = GaugeMetricFamily(
            "stream_group_pending_entries", "Entries delivered to a consumer group and not "
            "acknowledged.", labels=[*s, "stream", "group"])
        self.group_lag = GaugeMetricFamily(
            "stream_group_lag_entries", "Entries not yet delivered to a consumer group.",
            labels=[*s, "stream", "group"])
        self.channel_pending = GaugeMetricFamily(
            "channel_pending_entries", "Signals delivered and not acknowledged, summed over the "
            "channel's consumer groups (one per coordinator).", labels=[*s, "channel"])
        self.channel_lag = GaugeMetricFamily(
            "channel_lag_entries_max", "Signals not yet delivered to the channel's most lagging "
            "consumer group.", labels=[*s, "channel"])
        self.up = GaugeMetricFamily(
            "bus_up", "1 if this scrape could read the swarm's state from Redis.", labels=s)
        self.past_deadline, self.overdue_max, self.reported_dead = lapse_families()

    def add_projected(self, p: SwarmEvents) -> None:
        for outcome, histogram in sorted(p.durations.items()):
            histogram.add_to(self.durations, [p.swarm, outcome])
        for channel, histogram in sorted(p.latencies.items()):
            histogram.add_to(self.latencies, [p.swarm, channel])
        self.timeouts.add_metric([p.swarm], p.timeouts)
        self.dead_reported.add_metric([p.swarm], p.dead_reported)

    def add_channel(self, swarm: str, channel: str, stats: StreamInfo) -> None:
        self.channel_pending.add_metric([swarm, channel], sum(g.pending for g in stats.groups))
        lags = [g.lag for g in stats.groups if g.lag is not None]
        if lags:
            self.channel_lag.add_metric([swarm, channel], max(lags))

    def merge(self, other: _Families) -> None:
        for name, family in vars(self).items():
            family.samples.extend(getattr(other, name).samples)

    def all(self) -> list[Metric]:
        return [value for value in vars(self).values() if isinstance(value, Metric)]


async def serve(bus: Bus, swarms: Sequence[str] = (), *, host: str = "127.0.0.1",
                port: int = DEFAULT_PORT,
                task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve ``/metrics`` on ``host:port`` until cancelled; report the port once ready.

    Ready means every swarm's projection caught up with the retained history. Port 0 picks a
    free port.
    """
    exporter = Exporter(bus, swarms)
    failure: StreambusError | None = None
    async with anyio.create_task_group() as tg:
        try:
            await tg.start(exporter.run)
            server, _ = start_http_server(port, addr=host, registry=exporter.registry)
        except (OSError, OverflowError) as exc:
            failure = StreambusError(f"cannot serve metrics on {host}:{port}: {exc}")
        except StreambusError as exc:
            failure = exc  # raised below, outside the task group, so not as an ExceptionGroup
        if failure is not None:
            tg.cancel_scope.cancel()
        else:
            log.info("serving metrics of %s at http://%s:%d/metrics",
                     ", ".join(exporter.projections) or "no swarm yet", host, server.server_port)
            try:
                task_status.started(server.server_port)
                await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(server.shutdown)
                    server.server_close()
    if failure is not None:
        raise failure


__all__ = ["DEFAULT_PORT", "Exporter", "SwarmEvents", "serve"]
