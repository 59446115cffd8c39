"""Fan-out latency: one signal, N coordinators waiting for it, streambus next to the baselines.

Run on its own as ``python -m benchmarks.fanout [--processes N] [--waiters W] [--rounds R]
[--systems ...] [--out DIR] [--redis-url URL]``; ``python -m benchmarks`` runs it at 100, 1,000
and 10,000 coordinators as part of the whole harness.

Method
------
One machine, one server: a throwaway ``valkey-server`` (free port, no persistence) unless a URL is
given. The parent starts P worker processes (``python -m benchmarks.worker fanout``), each
hosting W waiters (coordinators ``c0`` .. ``c{N-1}``, N = P x W), and sends each round's signal
itself. Per round and system:

1. *arm* (not measured): every worker starts its W waiters and reports ``ready`` once they are
   armed as far as it can tell (streambus: every waiter registered with the process's dispatcher
   and the dispatcher blocked); then the parent polls the server (every ms) until it agrees:
   ``INFO clients`` counts every blocked read (P dispatcher reads for streambus, N reads for
   ``XREADGROUP`` and ``BLPOP``), ``PUBSUB NUMSUB`` counts N subscribers.
2. *send*: the parent reads the clock, puts the reading in the signal, and sends it.
3. *receive*: each waiter reads the clock as soon as it has the signal (streambus: when
   ``wait_for`` returned, i.e. after its ACK is recorded; ``XREADGROUP``: after ``XACK``).
   Latency = receive - send (see :mod:`benchmarks.common` for the clock).

Systems are interleaved round by round in the same processes, so drift in machine load hits all
alike, unless their connections would not fit in the server's ``maxclients`` together; then they
run one after another and each system's connections are closed after its last round. The first
round of each system (connections, script loading) is a warm-up and is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio

from benchmarks.children import ChildGroup
from benchmarks.common import (
    CLOCK_NOTE,
    BenchmarkError,
    load_average,
    machine_busy_s,
    machine_facts,
    max_clients,
    percentile_curve,
    report_failure,
    summarize,
)
from benchmarks.progress import Reporter
from benchmarks.session import Session, run
from benchmarks.systems import (
    BLPOP,
    CONNECTED,
    PUBSUB,
    STREAMBUS,
    STREAMBUS_ACK,
    XREADGROUP,
    Names,
    Sender,
    label,
    poll_interval,
)

STARTUP_TIMEOUT_S: Final = 180.0
ROUND_TIMEOUT_S: Final = 60.0
READY_POLL_S: Final = 0.001
CONNECTION_HEADROOM: Final = 500


@dataclass(frozen=True, slots=True)
class SystemPlan:
    """How many rounds one system runs in a scenario (plus uncounted warm-up rounds)."""

    system: str
    rounds: int
    warmup: int = 1

    @property
    def steps(self) -> int:
        return self.warmup + self.rounds


@dataclass(frozen=True, slots=True)
class FanoutSpec:
    """One fan-out scenario: P processes x W waiters, and the systems it measures."""

    scenario: str
    title: str
    processes: int
    per_process: int
    plans: tuple[SystemPlan, ...]
    notes: tuple[str, ...] = ()

    @property
    def coordinators(self) -> int:
        return self.processes * self.per_process

    @property
    def steps(self) -> int:
        return sum(plan.steps for plan in self.plans)


@dataclass(frozen=True, slots=True)
class Step:
    system: str
    round: int
    close_after: bool = False


@dataclass
class SystemRecord:
    """What one system's rounds produced."""

    plan: SystemPlan
    latencies_us: list[int] = field(default_factory=list)
    sender_us: list[int] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    missed: int = 0
    stale: int = 0

    def add(self, round_: int, dones: list[dict[str, Any]], sample: int | None,
            arm_s: float, fanout_s: float, cost: dict[str, Any]) -> dict[str, Any]:
        latencies = sorted(x for done in dones for x in done["latencies_us"])
        missed = sum(int(done["missed"]) for done in dones)
        row = {
            "round": round_, "warmup": round_ < self.plan.warmup, "received": len(latencies),
            "missed": missed, "median_us": latencies[len(latencies) // 2] if latencies else None,
            "max_us": latencies[-1] if latencies else None, "arm_s": round(arm_s, 4),
            "fanout_s": round(fanout_s, 4), "sender_us": sample,
            "worker_arm_cpu_s": round(sum(float(d["arm_cpu_s"]) for d in dones), 4),
            "worker_receive_cpu_s": round(sum(float(d["receive_cpu_s"]) for d in dones), 4),
            # Garbage collection while receiving (arming's is kept apart: it is not measured).
            "worker_gc_s": round(sum(float(d.get("gc_s", 0)) for d in dones), 4),
            "worker_gc_full": sum(int(d.get("gc_full", 0)) for d in dones),
            "worker_arm_gc_s": round(sum(float(d.get("arm_gc_s", 0)) for d in dones), 4),
            "load_1m": load_average()[0], **cost,
        }
        self.rounds.append(row)
        if round_ >= self.plan.warmup:
            self.latencies_us.extend(latencies)
            self.missed += missed
            self.stale += sum(int(done["stale"]) for done in dones)
            if sample is not None:
                self.sender_us.append(sample)
        return row

    def document(self) -> dict[str, Any]:
        measured = [r for r in self.rounds if not r["warmup"]]
        doc: dict[str, Any] = {
            "system": self.plan.system, "label": label(self.plan.system),
            "rounds": self.plan.rounds, "warmup_rounds": self.plan.warmup,
            "latency": summarize(self.latencies_us), "missed": self.missed, "stale": self.stale,
            "curve": percentile_curve(self.latencies_us) if self.latencies_us else [],
            "worker_cpu_ms_per_round": {
                key: round(1000 * sum(r[f"worker_{key}_cpu_s"] for r in measured)
                           / max(1, len(measured)), 1) for key in ("arm", "receive")},
            "server_cpu_ms_per_round": _mean(r["server_cpu_ms"] for r in measured),
            "worker_gc_ms_per_round": _mean(1000 * r["worker_gc_s"] for r in measured),
            "worker_gc_full_collections": sum(r["worker_gc_full"] for r in measured),
            "others_cpu_pct": _mean(r["others_cpu_pct"] for r in measured),
            "per_round": self.rounds,
        }
        if self.sender_us:
            doc["publish_to_all_acked"] = summarize(self.sender_us)
        return doc


async def run_fanout(spec: FanoutSpec, session: Session) -> dict[str, Any]:
    """Run one scenario; return its result document (see the module docstring)."""
    names = Names(session.namespace, spec.scenario)
    coordinators = [names.coordinator(i) for i in range(spec.coordinators)]
    systems = [plan.system for plan in spec.plans]
    sender = Sender(session.bus, session.admin, names, coordinators)
    await sender.prepare(systems)
    interleaved = await _fits_together(spec, session)
    records = {plan.system: SystemRecord(plan) for plan in spec.plans}
    started, load_start = time.monotonic(), load_average()
    base_blocked = await session.blocked_clients()
    async with ChildGroup(session.url) as group:
        for index in range(spec.processes):
            await group.spawn("fanout", {
                "namespace": session.namespace, "scenario": spec.scenario,
                "first": index * spec.per_process, "count": spec.per_process,
            }, name=f"worker {index} of {spec.title}")
        await group.gather("hello", STARTUP_TIMEOUT_S)
        session.reporter.log(f"{spec.title}: {spec.processes} worker processes up in "
                             f"{time.monotonic() - started:.1f} s")
        for step in schedule(spec, interleaved=interleaved):
            arm = _Arm(spec, session, group, names, base_blocked)
            row = await arm.run_step(step, sender, records[step.system])
            session.reporter.advance(_note(step, row))
            if step.close_after:
                await group.broadcast({"cmd": "close", "system": step.system})
                await group.gather("closed", ROUND_TIMEOUT_S, system=step.system)
    return _document(spec, records, interleaved, started, load_start)


@dataclass
class _Arm:
    spec: FanoutSpec
    session: Session
    group: ChildGroup
    names: Names
    base_blocked: int

    async def run_step(self, step: Step, sender: Sender, record: SystemRecord
                       ) -> dict[str, Any]:
        timeout = ROUND_TIMEOUT_S + 2 * (poll_interval(step.system) or 0)
        began = anyio.current_time()
        await self.group.broadcast({"cmd": "arm", "system": step.system, "round": step.round,
                                    "timeout": timeout})
        await self.group.gather("ready", timeout, system=step.system, round=step.round)
        await self._server_agrees(step.system, timeout)
        cost = _Cost()
        await cost.start(self.session)
        armed = anyio.current_time()
        sample = await sender.send(step.system, step.round)
        dones = await self.group.gather("done", timeout + 10, system=step.system,
                                        round=step.round)
        fanout_s = anyio.current_time() - armed
        await cost.stop(self.session, dones)
        return record.add(step.round, dones, sample, armed - began, fanout_s, cost.row())

    async def _server_agrees(self, system: str, timeout: float) -> None:
        """Poll until the server sees every read blocked / every subscriber (not measured)."""
        if system in (STREAMBUS, STREAMBUS_ACK):
            wanted, count = self.base_blocked + self.spec.processes, self.session.blocked_clients
        elif system in (XREADGROUP, BLPOP):
            wanted, count = self.base_blocked + self.spec.coordinators, \
                self.session.blocked_clients
        elif system == PUBSUB:
            wanted, count = self.spec.coordinators, self._subscribers
        else:
            return
        deadline = anyio.current_time() + timeout
        while (seen := await count()) < wanted:
            if anyio.current_time() > deadline:
                raise BenchmarkError(f"{self.spec.title} / {system}: the server saw only "
                                     f"{seen} of {wanted} waiters armed after {timeout:.0f} s")
            await anyio.sleep(READY_POLL_S)

    async def _subscribers(self) -> int:
        reply = await self.session.admin.pubsub_numsub(self.names.pubsub_channel)
        return int(reply[0][1]) if reply else 0


@dataclass
class _Cost:
    """What one fan-out cost, from just before the send until every worker reported: the
    server's CPU and its busiest commands, and the CPU of processes that are not ours (other
    jobs on a shared machine: the machine's busy time minus ours, approximate)."""

    server_cpu_s: float = 0.0
    commands: dict[str, tuple[int, int]] = field(default_factory=dict)
    machine_s: float = 0.0
    parent_s: float = 0.0
    wall_s: float = 0.0
    others_s: float = 0.0

    async def start(self, session: Session) -> None:
        self.server_cpu_s, self.commands = await session.server_stats()
        self.machine_s, self.parent_s = machine_busy_s(), time.process_time()
        self.wall_s = time.perf_counter()

    async def stop(self, session: Session, dones: list[dict[str, Any]]) -> None:
        machine, parent = machine_busy_s() - self.machine_s, time.process_time() - self.parent_s
        self.wall_s = time.perf_counter() - self.wall_s
        server, commands = await session.server_stats()
        self.server_cpu_s = server - self.server_cpu_s
        ours = self.server_cpu_s + parent + sum(float(d["receive_cpu_s"]) for d in dones)
        self.others_s = max(0.0, machine - ours)
        before = self.commands
        self.commands = {
            name: (calls - before.get(name, (0, 0))[0], usec - before.get(name, (0, 0))[1])
            for name, (calls, usec) in commands.items()
            if calls > before.get(name, (0, 0))[0] and not name.startswith("info")}

    def row(self) -> dict[str, Any]:
        busiest = sorted(self.commands.items(), key=lambda item: -item[1][1])[:6]
        return {"server_cpu_ms": round(1000 * self.server_cpu_s, 2),
                "others_cpu_pct": round(100 * self.others_s / max(1e-6, self.wall_s)
                                        / (os.cpu_count() or 1), 1),
                "server_commands": {name: {"calls": c, "usec": u} for name, (c, u) in busiest},
                "server_calls": sum(calls for calls, _ in self.commands.values())}


def schedule(spec: FanoutSpec, *, interleaved: bool) -> Iterator[Step]:
    """Round by round across systems when ``interleaved``, else system after system."""
    if not interleaved:
        for plan in spec.plans:
            for round_ in range(plan.steps):
                yield Step(plan.system, round_, close_after=round_ == plan.steps - 1)
        return
    for round_ in range(max(plan.steps for plan in spec.plans)):
        for plan in spec.plans:
            if round_ < plan.steps:
                yield Step(plan.system, round_)


async def _fits_together(spec: FanoutSpec, session: Session) -> bool:
    """Whether every system's connections fit in the server's ``maxclients`` at once."""
    held = sum(spec.coordinators for plan in spec.plans if plan.system in CONNECTED)
    return held + CONNECTION_HEADROOM + 40 * spec.processes <= await max_clients(session.admin)


def _note(step: Step, row: dict[str, Any]) -> str:
    kind = "warm-up" if row["warmup"] else "round"
    median = row["median_us"] / 1000 if row["median_us"] is not None else float("nan")
    peak = row["max_us"] / 1000 if row["max_us"] is not None else float("nan")
    extra = (f", publish->all acked {row['sender_us'] / 1000:.1f} ms"
             if row["sender_us"] is not None else "")
    missed = f", {row['missed']} MISSED" if row["missed"] else ""
    return (f"{step.system} {kind} {step.round}: median {median:.2f} ms, max {peak:.2f} ms"
            f"{extra}{missed} (armed in {row['arm_s'] * 1000:.0f} ms)")


def _document(spec: FanoutSpec, records: dict[str, SystemRecord], interleaved: bool,
              started: float, load_start: list[float]) -> dict[str, Any]:
    systems = {name: record.document() for name, record in records.items()}
    return {
        "workload": "fanout", "scenario": spec.scenario, "title": spec.title,
        "coordinators": spec.coordinators, "processes": spec.processes,
        "waiters_per_process": spec.per_process,
        "order": ("interleaved round by round in the same processes" if interleaved else
                  "system after system (their connections do not fit in maxclients together); "
                  "each system's connections closed after its last round"),
        "notes": list(spec.notes), "clock": CLOCK_NOTE, "systems": systems,
        "ratios_to_streambus": ratios(systems),
        "runtime_s": round(time.monotonic() - started, 2),
        "load_average": {"start": load_start, "end": load_average()},
    }


def _mean(values: Iterable[float]) -> float | None:
    items = list(values)
    return round(sum(items) / len(items), 2) if items else None


def ratios(systems: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each system's p50 and p99 divided by streambus's (> 1: slower than streambus)."""
    ref = systems.get(STREAMBUS, {}).get("latency", {})
    out: dict[str, dict[str, float]] = {}
    for name, doc in systems.items():
        lat = doc["latency"]
        if lat.get("count") and ref.get("count"):
            out[name] = {key: round(lat[f"{key}_us"] / max(1, ref[f"{key}_us"]), 2)
                         for key in ("p50", "p99")}
    return out


# -- standalone command line -------------------------------------------------------------------


def render(doc: dict[str, Any]) -> str:
    lines = [f"{doc['title']}: {doc['coordinators']} coordinators = {doc['processes']} "
             f"processes x {doc['waiters_per_process']}; {doc['order']}",
             f"latency = receive - send; {doc['clock']}",
             f"{'system':<14}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'p99.9 ms':>10}"
             f"{'max ms':>10}{'p99 x sb':>10}"]
    for name, system in doc["systems"].items():
        lat = system["latency"]
        if not lat.get("count"):
            continue
        cells = "".join(f"{lat[k] / 1000:>10.3f}"
                        for k in ("p50_us", "p90_us", "p99_us", "p99.9_us", "max_us"))
        ratio = doc["ratios_to_streambus"].get(name, {}).get("p99", float("nan"))
        lines.append(f"{name:<14}{cells}{ratio:>10.2f}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fanout",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--processes", type=_positive, default=100, help="worker processes")
    parser.add_argument("--waiters", type=_positive, default=1, help="waiters per process")
    parser.add_argument("--rounds", type=_positive, default=20, help="measured rounds")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted rounds first")
    parser.add_argument("--systems", nargs="+", default=[STREAMBUS, XREADGROUP],
                        help="streambus streambus-ack xreadgroup blpop pubsub poll-100ms ...")
    parser.add_argument("--out", type=Path, default=Path("results"), help="for fanout.json")
    parser.add_argument("--redis-url", help="use this server instead of a throwaway one")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    spec = FanoutSpec("fanout", f"fan-out to {args.processes * args.waiters}",
                      args.processes, args.waiters,
                      tuple(SystemPlan(s, args.rounds, max(0, args.warmup))
                            for s in args.systems))
    started = time.monotonic()
    try:
        with Reporter(spec.steps, quiet=args.quiet) as reporter:
            doc = run(lambda session: _standalone(spec, session), redis_url=args.redis_url,
                      reporter=reporter)
    except (BenchmarkError, BaseExceptionGroup) as exc:
        return report_failure("fanout", exc)
    doc["runtime_s"] = round(time.monotonic() - started, 2)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fanout.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(render(doc))
    print(f"wrote {args.out / 'fanout.json'}; total runtime {doc['runtime_s']:.1f} s")
    return 0


async def _standalone(spec: FanoutSpec, session: Session) -> dict[str, Any]:
    with session.reporter.workload(spec.title, spec.steps):
        doc = await run_fanout(spec, session)
    doc.update(machine=machine_facts(), server=session.server)
    return doc


if __name__ == "__main__":
    sys.exit(main())
