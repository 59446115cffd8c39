"""One soak, start to end: servers, coordinators, publishers and faults; then the drain and the
collection of what Redis recorded, for the checker.

Phases: start every coordinator and wait until each has begun a wait; publish and inject the
scheduled faults for the soak's duration; heal everything (thaw, restart, link up, topology
healthy); raise the drain flag and publish every channel's end marker; wait until every
coordinator has received every end marker (it reads its group in stream order, pending entries
first, so by then it has had everything before); read the ACK streams and the channel streams
through the bus's public read API.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Final

import anyio
import anyio.to_thread
import msgspec

import streambus
from benchmarks.chaos.coordinator import end_marker
from benchmarks.chaos.fleet import Fleet
from benchmarks.chaos.journal import Line, read_journal
from benchmarks.chaos.plan import CHANNELS, LINK_FAULT, QUIET, FaultEvent, SoakPlan
from benchmarks.chaos.servers import NetnsLink, Servers, faketime_library, skewed_env
from benchmarks.chaos.worker import SOAK_LIMITS
from benchmarks.chaos.workload import InProcess, Publishers, PublishRecord
from benchmarks.common import BenchmarkError, raise_on_signal
from streambus import Ack, Bus
from streambus.keys import SwarmKeys
from streambus.schema import decode_fields

START_LIMIT_S: Final = 90.0
DRAIN_LIMIT_S: Final = 240.0
PAGE: Final = 1000
PROBE_EVERY_S: Final = 0.25
STALL_S: Final = 0.5
MASTER_CHANGE_LEAD_S: Final = 3.0
"""An observed master change disrupts from this long before it is seen: Sentinel's and the
cluster's 1 s failure detection, the vote and the promotion."""


@dataclass
class FaultRecord:
    kind: str
    target: str
    affected: tuple[str, ...]
    started: float
    ended: float = 0.0
    detail: str = ""


@dataclass
class Collected:
    """Everything the checker reads."""

    plan: SoakPlan
    directory: Path
    publishes: list[PublishRecord]
    journals: dict[str, list[Line]]
    acks: dict[str, list[Ack]]
    """Per swarm, every Ack entry of its ACK stream, in order."""
    ack_ids: dict[tuple[str, str], str]
    """(signal, coordinator) -> the Ack's entry id."""
    streams: dict[tuple[str, str], list[tuple[str, str]]]
    """(swarm, channel) -> (stream id, signal id) of every entry at the end."""
    faults: list[FaultRecord]
    fleet: Fleet
    drained: bool
    undrained: dict[str, list[str]] = field(default_factory=dict)
    crashes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class Soak:
    def __init__(self, plan: SoakPlan, directory: Path) -> None:
        self.plan = plan
        self.directory = directory
        self.journals = directory / "journals"
        self.journals.mkdir(parents=True, exist_ok=True)
        self.drain_flag = directory / "drain"
        self.namespace = f"soak{plan.seed % 10**8}"
        self.link = NetnsLink() if LINK_FAULT in plan.kinds else None
        self.servers = Servers(plan.topology, directory, self.link)
        self.faults: list[FaultRecord] = []
        self.crashes: list[str] = []
        self.timings: dict[str, float] = {}
        library = faketime_library()
        skews = {w.skew for w in plan.workers if w.skew is not None}
        self.fleet = Fleet(
            {w.name: w for w in plan.workers}, "", None,
            self.link.prefix() if self.link is not None else [],
            {s: skewed_env(library, s) for s in skews} if library is not None else {},
            self.namespace, self.journals, self.drain_flag)

    def __repr__(self) -> str:
        return f"<Soak {self.plan.topology} seed={self.plan.seed} {self.directory}>"

    async def run(self) -> Collected:
        """Run the soak; SIGINT/SIGTERM stop it (as :class:`Interrupted`) with every process
        it started stopped and the namespace removed."""
        began = time.monotonic()
        try:
            if self.link is not None:
                self.link.setup()
            await anyio.to_thread.run_sync(self.servers.start)
            self.fleet.url = self.servers.url
            self.fleet.netns_url = self.servers.netns_url()
            async with anyio.create_task_group() as tg:
                await tg.start(raise_on_signal)
                collected = await self._run_with_servers(began)
                tg.cancel_scope.cancel()
            return collected
        finally:
            self.fleet.close()
            await anyio.to_thread.run_sync(self.servers.stop)
            if self.link is not None:
                self.link.teardown()

    async def _run_with_servers(self, began: float) -> Collected:
        plan = self.plan
        connect = partial(streambus.connect, self.servers.url, namespace=self.namespace,
                          limits=SOAK_LIMITS, block_ms=500)
        async with connect(publish_retry_budget_s=1.0) as pub_bus, connect() as own_bus:
            publishers = Publishers(pub_bus, plan.topology, plan.seed,
                                    {s: plan.coordinators_of(s) for s in plan.swarms},
                                    self.directory / "publishes.jsonl")
            in_process = InProcess(own_bus, plan.in_process, self.journals, self.drain_flag)
            async with anyio.create_task_group() as tg:
                for name in self.fleet.specs:
                    self.fleet.start(name)
                await tg.start(in_process.run)
                tg.start_soon(self._watch_masters)
                await self._until(self._all_begun, START_LIMIT_S, "start")
                self.timings["start_s"] = time.monotonic() - began
                chaos_began = time.monotonic()
                until = anyio.current_time() + plan.duration_s
                async with anyio.create_task_group() as work:
                    for swarm in plan.swarms:
                        work.start_soon(publishers.run, swarm, until)
                    await self._inject(publishers, in_process, chaos_began)
                self.timings["chaos_s"] = time.monotonic() - chaos_began
                drain_began = time.monotonic()
                await self._heal()
                self.drain_flag.touch()
                await publishers.publish_ends(plan.swarms, (*CHANNELS, QUIET))
                drained = await self._until(self._all_drained, DRAIN_LIMIT_S, "drain",
                                            fail=False)
                self.timings["drain_s"] = time.monotonic() - drain_began
                tg.cancel_scope.cancel()
            self.fleet.close()
            return await self._collect(own_bus, publishers.records, drained)

    async def _watch_masters(self) -> None:
        """Record what the schedule did not cause: a master that stalls (its PING, or finding
        it, takes over :data:`STALL_S`; on a loaded machine a server's ``fsync`` can) and a
        master that changes (under load a Sentinel set or a cluster fails over on its own).
        The checker counts both as faults, as it counts the scheduled ones."""
        keys = [SwarmKeys.for_swarm(self.namespace, s).channel(CHANNELS[0])
                for s in self.plan.swarms]
        everyone = tuple(self.plan.all_coordinators)
        last: tuple[int, ...] | None = None
        stalled_since: float | None = None
        while True:
            asked = time.time()
            try:
                now: tuple[int, ...] | None = await anyio.to_thread.run_sync(
                    self.servers.probe, keys)
            except Exception:  # down, frozen or failing over: what is watched for
                now = None
            answered = time.time()
            if now is None or answered - asked > STALL_S:
                stalled_since = asked if stalled_since is None else stalled_since
            elif stalled_since is not None:  # one record per stall, once it is over
                self._record(FaultRecord("server_stall", "masters", everyone, stalled_since,
                                         answered, f"{answered - stalled_since:.2f} s"))
                stalled_since = None
            if now is not None and last is not None and now != last:
                self._record(FaultRecord("master_change", f"{last} -> {now}", everyone,
                                         answered - MASTER_CHANGE_LEAD_S, answered, "observed"))
            last = now or last
            await anyio.sleep(PROBE_EVERY_S)

    def _record(self, record: FaultRecord) -> None:
        self.faults.append(record)
        with (self.directory / "faults.jsonl").open("a") as log:
            log.write(json.dumps(asdict(record)) + "\n")

    # -- phases ------------------------------------------------------------------------------

    async def _until(self, condition: Callable[[], bool], limit: float, what: str, *,
                     fail: bool = True) -> bool:
        deadline = time.monotonic() + limit
        while not condition():
            if time.monotonic() > deadline:
                if fail:
                    raise BenchmarkError(f"soak {what} did not finish within {limit:.0f} s; "
                                       f"see {self.directory}")
                return False
            self.crashes += self.fleet.revive_dead()
            await anyio.sleep(0.25)
        return True

    def _journal(self, coordinator: str) -> list[Line]:
        return read_journal(self.journals / f"{coordinator}.jsonl")

    def _all_begun(self) -> bool:
        return all(any(line.kind == "begin" for line in self._journal(c))
                   for c in self.plan.all_coordinators)

    def _missing_ends(self, coordinator: str) -> list[str]:
        got = {line["sig"] for line in self._journal(coordinator) if line.kind == "recv"}
        return [c for c in (*CHANNELS, QUIET) if end_marker(c) not in got]

    def _all_drained(self) -> bool:
        return not any(self._missing_ends(c) for c in self.plan.all_coordinators)

    async def _heal(self) -> None:
        """Everything up, unfrozen and linked before the drain."""
        for name in self.fleet.specs:
            self.fleet.thaw(name)
        if self.link is not None:
            self.link.set_link(up=True)
        await anyio.to_thread.run_sync(self.servers.after_fault)
        self.crashes += self.fleet.revive_dead()

    async def _inject(self, publishers: Publishers, in_process: InProcess,
                      began: float) -> None:
        for event in self.plan.schedule:
            over = time.monotonic() - began >= self.plan.duration_s
            if over and {f.kind for f in self.faults} >= set(self.plan.kinds):
                return  # slow faults (failovers) fell behind the schedule: the soak is over
            await anyio.sleep(max(0.0, began + event.at - time.monotonic()))
            await self._fault(event, publishers, in_process)
            self.crashes += self.fleet.revive_dead()

    async def _fault(self, event: FaultEvent, publishers: Publishers,
                     in_process: InProcess) -> None:
        """Inject one fault and wait until it is over; then heal what it left down."""
        rng = random.Random(event.seed)
        record = FaultRecord(event.kind, "", tuple(self.plan.all_coordinators), time.time())
        if event.kind in ("coordinator_kill", "coordinator_freeze"):
            await self._coordinator_fault(record, event.pick, rng)
        elif event.kind == "wait_cancel":
            record.detail = await in_process.cancel_one(rng, event.pick, publishers.hub)
            record.target = record.detail.split()[0]
            record.affected = (record.target,)
            record.started = time.time()
        elif event.kind == LINK_FAULT:
            await self._link_fault(record, rng)
        else:
            await self._server_fault(record, event.pick, rng, publishers)
        record.ended = time.time()
        self._record(record)
        await anyio.to_thread.run_sync(self.servers.after_fault)

    async def _coordinator_fault(self, record: FaultRecord, pick: int,
                                 rng: random.Random) -> None:
        kill = record.kind == "coordinator_kill"
        name = sorted(self.fleet.specs)[pick % len(self.fleet.specs)]
        record.target = name
        record.affected = tuple(c.coordinator for c in self.fleet.specs[name].coordinators)
        pause = rng.uniform(0.0, 0.4) if kill else rng.uniform(0.3, 3.0)
        record.started = time.time()
        (self.fleet.kill if kill else self.fleet.freeze)(name)
        await anyio.sleep(pause)
        (self.fleet.start if kill else self.fleet.thaw)(name)
        record.detail = f"{'down' if kill else 'frozen'} {pause:.2f} s"

    async def _link_fault(self, record: FaultRecord, rng: random.Random) -> None:
        assert self.link is not None
        cut = rng.uniform(0.5, 4.0)
        record.target = "netns workers"
        record.affected = tuple(c.coordinator for w in self.plan.workers if w.in_netns
                                for c in w.coordinators)
        record.started = time.time()
        self.link.set_link(up=False)
        await anyio.sleep(cut)
        self.link.set_link(up=True)
        record.detail = f"cut {cut:.2f} s"

    async def _server_fault(self, record: FaultRecord, pick: int, rng: random.Random,
                            publishers: Publishers) -> None:
        swarm = self.plan.swarms[pick % len(self.plan.swarms)]
        key = SwarmKeys.for_swarm(self.namespace, swarm).channel(CHANNELS[0])
        record.target = swarm if self.plan.topology == "cluster" else "server"
        # Land just after a publish returns, while coordinators receive and acknowledge.
        await publishers.hub.next_publish(timeout=1.0)
        await anyio.sleep(rng.uniform(0.0, 0.008))
        record.started = time.time()
        fault = self.servers.faults()[record.kind]
        record.detail = await anyio.to_thread.run_sync(fault, rng, key)

    # -- what Redis recorded -----------------------------------------------------------------

    async def _collect(self, bus: Bus, publishes: list[PublishRecord],
                       drained: bool) -> Collected:
        plan = self.plan
        (self.directory / "lives.jsonl").write_text(
            "".join(json.dumps(asdict(life)) + "\n" for life in self.fleet.lives))
        acks: dict[str, list[Ack]] = {}
        ack_ids: dict[tuple[str, str], str] = {}
        streams: dict[tuple[str, str], list[tuple[str, str]]] = {}
        for swarm in plan.swarms:
            keys = bus.keys(swarm)
            acks[swarm] = []
            for entry_id, fields in await _read_all(bus, keys.acks):
                event = decode_fields(fields)
                if isinstance(event, Ack):
                    acks[swarm].append(event)
                    ack_ids[(event.signal_id, event.coordinator)] = entry_id
            for channel in (*CHANNELS, QUIET):
                entries = await _read_all(bus, keys.channel(channel))
                streams[(swarm, channel)] = [
                    (entry_id, getattr(decode_fields(fields), "signal_id", "?"))
                    for entry_id, fields in entries]
        (self.directory / "recorded.json").write_text(json.dumps({
            "acks": {s: [msgspec.structs.asdict(a) for a in acks[s]] for s in acks},
            "ack_ids": [[*key, value] for key, value in ack_ids.items()],
            "streams": [[*key, value] for key, value in streams.items()]}))
        return Collected(
            plan, self.directory, publishes,
            {c: self._journal(c) for c in plan.all_coordinators}, acks, ack_ids, streams,
            self.faults, self.fleet, drained,
            {c: m for c in plan.all_coordinators if (m := self._missing_ends(c))},
            self.crashes, self.timings)


async def _read_all(bus: Bus, stream: str) -> list[tuple[str, dict[bytes, bytes]]]:
    """Every entry of ``stream`` that still has a body, paged."""
    out: list[tuple[str, dict[bytes, bytes]]] = []
    start = "-"
    while True:
        page = await bus.read_entries(stream, start, PAGE)
        out += [(entry_id, fields) for entry_id, fields in page if fields is not None]
        if len(page) < PAGE:
            return out
        start = f"({page[-1][0]}"
