"""What each durability level loses when the master dies: ``python -m benchmarks.failover_loss
[--trials N] --out DIR``.

For every topology (one server, a Sentinel set, a 3-master Cluster; started here on free ports
by :mod:`streambus.testing`, every data node with ``appendonly yes`` and ``appendfsync
everysec``, the production default) and every durability level (``none``, ``fsync``,
``replicated``), each trial:

1. C publisher tasks publish signals with ids of their own to one swarm's channel, each
   ``bus.publish(..., durability=LEVEL)`` awaited before the next. A publish that returns is
   *acknowledged*; one that raises (``DurabilityNotReached``: appended but not confirmed at the
   level; ``BusUnavailable``: the retry budget ran out) is not.
2. After ``--warm`` seconds the master serving the swarm gets SIGKILL, with publishes in
   flight. Recovery is what the topology does: single, the server restarted at once from its
   AOF (as systemd ``Restart=always`` would); sentinel, the sentinels promote the replica;
   cluster, the replica of the killed master is promoted. Then the killed node is started again
   (a replica of the new master where it was replaced) and the publishers go on for ``--post``
   seconds.
3. The channel is read back through the bus (``bus.read_entries``), and every acknowledged
   signal id that is not there is *lost*.

Recovery time = from the SIGKILL until the first publish begun after it was acknowledged
(that includes the publish's own retries, which the bus makes while the topology recovers).
Publishes retried after a failover are safe: the signal id makes them idempotent.

What this does not exercise: a machine or OS crash (a SIGKILLed process's writes are in the
kernel's page cache, so ``appendfsync everysec`` loses nothing to it), network partitions (the
cause of Jepsen's losses on Sentinel), or a replica lagging by more than the localhost link.
Writes ``DIR/failover-loss.json`` and ``DIR/failover-loss.md``; no timing is asserted.
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, get_args

import anyio
import anyio.to_thread

import streambus
from benchmarks.common import (
    BenchmarkError,
    load_average,
    machine_facts,
    raise_on_signal,
    report_failure,
)
from benchmarks.progress import Reporter
from benchmarks.topologies import KINDS, SHAPES, Kind, Topology, binary_of, started
from streambus.schema import Signal, decode_fields

NAMESPACE: Final = "loss"
CHANNEL: Final = "ch"
LEVELS: Final[tuple[streambus.Durability, ...]] = get_args(streambus.Durability)
PERSISTENCE: Final = ("appendfsync everysec",)
READ_PAGE: Final = 1000


@dataclass
class Publishes:
    """What the publishers saw: acknowledged ids with (began, returned), and failures."""

    acked: dict[str, tuple[float, float]] = field(default_factory=dict)
    duplicates: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    stop: bool = False

    async def publisher(self, bus: streambus.Bus, swarm: str, level: streambus.Durability,
                        index: int) -> None:
        n = 0
        while not self.stop:
            signal_id = f"p{index}-{n}"
            n += 1
            began = time.monotonic()
            try:
                published = await bus.publish(swarm, CHANNEL, {"n": n}, signal_id=signal_id,
                                              sender="bench", durability=level)
            except streambus.StreambusError as exc:
                name = type(exc).__name__
                self.failed[name] = self.failed.get(name, 0) + 1
                continue
            self.acked[signal_id] = (began, time.monotonic())
            self.duplicates += published.duplicate


async def _present(bus: streambus.Bus, swarm: str) -> set[str]:
    """Every signal id in the swarm's channel stream, read through the bus."""
    stream = bus.keys(swarm).channel(CHANNEL)
    found: set[str] = set()
    start = "-"
    while entries := await bus.read_entries(stream, start, READ_PAGE):
        for _entry_id, fields in entries:
            event = decode_fields(fields)
            if isinstance(event, Signal):
                found.add(event.signal_id)
        start = "(" + entries[-1][0]
    return found


async def trial(topology: Topology, bus: streambus.Bus, level: streambus.Durability,
                number: int, args: argparse.Namespace) -> dict[str, Any]:
    swarm = f"{level}-{number}"
    publishes = Publishes()
    async with anyio.create_task_group() as tg:
        for index in range(args.publishers):
            tg.start_soon(publishes.publisher, bus, swarm, level, index)
        await anyio.sleep(args.warm)
        recovery = await anyio.to_thread.run_sync(topology.kill_and_recover,
                                                  bus.keys(swarm).prefix)
        await anyio.sleep(args.post)
        publishes.stop = True
    present = await _present(bus, swarm)
    killed = recovery.killed_at
    lost = sorted(set(publishes.acked) - present)
    after = [end for began, end in publishes.acked.values() if began >= killed]
    return {
        "topology": topology.kind, "durability": level, "trial": number,
        "acked": len(publishes.acked),
        "acked_before_kill": sum(end < killed for _b, end in publishes.acked.values()),
        "in_flight_at_kill_acked": sum(b < killed <= e for b, e in publishes.acked.values()),
        "lost": len(lost), "lost_ids": lost[:20],
        # When the lost ones were acknowledged, in seconds from the SIGKILL (negative: before).
        "lost_acked_s": ([round(min(publishes.acked[i][1] for i in lost) - killed, 2),
                          round(max(publishes.acked[i][1] for i in lost) - killed, 2)]
                         if lost else None),
        "master_after": await anyio.to_thread.run_sync(
            lambda: topology.master_for(bus.keys(swarm).prefix).port),
        "present": len(present), "appended_but_not_acked": len(present - set(publishes.acked)),
        "duplicates": publishes.duplicates, "failed": publishes.failed,
        "serving_s": round(recovery.serving_at - killed, 2),
        "healed_s": round(recovery.healed_at - killed, 2),
        "first_ack_after_kill_s": round(min(after) - killed, 2) if after else None,
    }


async def measure(topologies: dict[Kind, Topology], args: argparse.Namespace,
                  reporter: Reporter) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    async with anyio.create_task_group() as tg:
        await tg.start(raise_on_signal)
        for kind, topology in topologies.items():
            async with streambus.connect(topology.url, namespace=NAMESPACE) as bus:
                for level in args.durability:
                    with reporter.workload(f"{kind} / {level}", args.trials):
                        for number in range(args.trials):
                            row = await trial(topology, bus, level, number, args)
                            rows.append(row)
                            reporter.advance(
                                f"acked {row['acked']}, lost {row['lost']}, first ack after "
                                f"kill {row['first_ack_after_kill_s']} s, failed "
                                f"{row['failed'] or 0}")
        tg.cancel_scope.cancel()
    return rows


def table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per topology x durability: sums over trials, recovery as median (min-max)."""
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault((row["topology"], row["durability"]), []).append(row)
    out = []
    for (kind, level), trials in cells.items():
        failed: dict[str, int] = {}
        for row in trials:
            for name, count in row["failed"].items():
                failed[name] = failed.get(name, 0) + count
        out.append({
            "topology": kind, "durability": level, "trials": len(trials),
            **{key: sum(r[key] for r in trials) for key in (
                "acked", "acked_before_kill", "in_flight_at_kill_acked", "lost",
                "appended_but_not_acked", "duplicates")},
            "failed": failed,
            "first_ack_after_kill_s": _spread([r["first_ack_after_kill_s"] for r in trials]),
            "serving_s": _spread([r["serving_s"] for r in trials]),
        })
    return out


def _spread(values: Sequence[float | None]) -> str:
    known = sorted(v for v in values if v is not None)
    if not known:
        return "never"
    median = known[len(known) // 2]
    return f"{median:.2f}" if len(known) == 1 else f"{median:.2f} ({known[0]:.2f}-{known[-1]:.2f})"


def render(doc: dict[str, Any]) -> str:
    run = doc["harness"]
    lines = [
        "# Acknowledged signals lost when the master is SIGKILLed", "",
        f"- command: `{run['command']}`",
        f"- machine: {doc['machine']['usable_cpus']} usable CPUs; load average "
        f"{run['load_average_start']} at the start, {run.get('load_average_end')} at the end",
        f"- server: {run['binary']}, every data node `appendonly yes`, "
        "`appendfsync everysec`",
        f"- topologies: {'; '.join(f'{k}: {SHAPES[k]}' for k in doc['topologies'])}",
        f"- per trial: {run['publishers']} publishers, SIGKILL after {run['warm']:g} s, "
        f"publishing until {run['post']:g} s after the killed node is back",
        f"- total runtime: {run['runtime_s']:.1f} s", "",
        "acked = publishes that returned; lost = acked but not in the channel afterwards; "
        "in flight = begun before the SIGKILL, acked after it; not acked = raised "
        "(by error type); first ack = from the SIGKILL to the first acked publish begun after "
        "it, median (min-max) over trials; serving = until a master served the swarm again.", "",
        "| topology | durability | trials | acked | of them in flight at kill | lost | "
        "not acked | first ack after kill s | serving again s |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for cell in doc["table"]:
        failed = ", ".join(f"{n} {c}" for n, c in cell["failed"].items()) or "0"
        lines.append(
            f"| {cell['topology']} | {cell['durability']} | {cell['trials']} | "
            f"{cell['acked']:,} | {cell['in_flight_at_kill_acked']} | {cell['lost']} | "
            f"{failed} | {cell['first_ack_after_kill_s']} | {cell['serving_s']} |")
    losses = [r for r in doc["trials"] if r["lost"]]
    if losses:
        lines += ["", "Trials that lost acknowledged signals:", ""]
        lines += [f"- {r['topology']} / {r['durability']} trial {r['trial']}: {r['lost']:,} of "
                  f"{r['acked']:,} lost, acknowledged {r['lost_acked_s'][0]} s to "
                  f"{r['lost_acked_s'][1]} s after the SIGKILL; the killed node back after "
                  f"{r['healed_s']} s; master afterwards: port {r['master_after']}"
                  for r in losses]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.failover_loss",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="for failover-loss.json/.md")
    parser.add_argument("--trials", type=int, default=3, help="kills per topology and level")
    parser.add_argument("--publishers", type=int, default=8, help="concurrent publishers")
    parser.add_argument("--warm", type=float, default=1.0, help="seconds before the SIGKILL")
    parser.add_argument("--post", type=float, default=1.0,
                        help="seconds of publishing after the killed node is back")
    parser.add_argument("--topologies", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--durability", nargs="+", choices=LEVELS, default=list(LEVELS))
    parser.add_argument("--binary", choices=("valkey", "redis"), default="valkey",
                        help="redis: Debian's 7.0 has no WAITAOF, so 'fsync' fails every "
                             "publish there")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="run the servers in DIR and keep it (their logs and configs: "
                             "sentinel-*/server.log tells who was promoted when)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    kinds: list[Kind] = [k for k in KINDS if k in args.topologies]
    binary = binary_of(args.binary)
    began = time.monotonic()
    doc: dict[str, Any] = {
        "harness": {"command": "python -m benchmarks.failover_loss " + shlex.join(argv),
                    "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "load_average_start": load_average(), "binary": binary.name,
                    "publishers": args.publishers, "warm": args.warm, "post": args.post},
        "machine": machine_facts(), "topologies": kinds}
    steps = len(kinds) * len(args.durability) * args.trials
    try:
        with contextlib.ExitStack() as stack, Reporter(steps, quiet=args.quiet) as reporter:
            if args.keep is not None:
                args.keep.mkdir(parents=True, exist_ok=False)
                where = args.keep
            else:
                where = Path(stack.enter_context(tempfile.TemporaryDirectory(
                    prefix="streambus-loss-")))
            topologies = {k: stack.enter_context(started(k, where, binary, appendonly=True,
                                                         config=PERSISTENCE)) for k in kinds}
            rows = anyio.run(measure, topologies, args, reporter)
    except KeyboardInterrupt:
        print("benchmarks.failover_loss: interrupted", file=sys.stderr)
        return 130
    except (BenchmarkError, BaseExceptionGroup) as exc:
        return report_failure("benchmarks.failover_loss", exc)
    doc.update(trials=rows, table=table(rows))
    doc["harness"].update(runtime_s=round(time.monotonic() - began, 2),
                          load_average_end=load_average())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "failover-loss.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / "failover-loss.md").write_text(render(doc))
    print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
