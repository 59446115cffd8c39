"""Heartbeat overhead: the CPU share of N coordinators heartbeating every interval.

A child process of its own hosts N coordinators, all blocked in ``wait_for`` (one dispatcher).
It measures its CPU time (``time.process_time``: user + system of the whole process) over a
window of whole heartbeat intervals twice: first blocked only, then with every coordinator also
heartbeating (``coordinator.heartbeating(interval)``, the same ``Heartbeater`` that
``wait_for(liveness=...)`` runs). The overhead is the difference, in % of one core. Windows
are whole intervals, so each holds exactly N beats per interval whatever their phase. The
server's CPU over each window (``INFO cpu``) is reported beside it.
"""

from __future__ import annotations

import time
from typing import Any, Final

import anyio
import anyio.abc
import redis.asyncio as aioredis

import streambus
from benchmarks.children import ChildGroup, child_url, emit, require
from benchmarks.common import load_average, poll_until
from benchmarks.session import Session
from benchmarks.systems import Names, StreambusWaiters
from streambus.liveness import Heartbeater

SCENARIO: Final = "heartbeat"


async def run_heartbeat(session: Session, coordinators: int, interval_s: float,
                        window_s: float) -> dict[str, Any]:
    load_start = load_average()
    async with ChildGroup(session.url) as group:
        child = await group.spawn("heartbeat", {
            "namespace": session.namespace, "count": coordinators, "interval": interval_s,
            "window": window_s}, name="heartbeat child")
        idle = await child.expect("window", 120 + 2 * window_s, phase="blocked")
        session.reporter.advance(f"{coordinators} blocked, no heartbeats: "
                                 f"{idle['cpu_pct']:.2f} % of a core")
        beating = await child.expect("window", 120 + 2 * window_s, phase="heartbeating")
    overhead = beating["cpu_pct"] - idle["cpu_pct"]
    session.reporter.advance(f"with heartbeats every {interval_s:g} s: "
                             f"{beating['cpu_pct']:.2f} % (overhead {overhead:.2f} %)")
    return {
        "workload": "heartbeat", "title": f"CPU of {coordinators:,} coordinators heartbeating",
        "coordinators": coordinators, "interval_s": interval_s, "window_s": window_s,
        "blocked_only": idle, "heartbeating": beating,
        "overhead_pct_of_one_core": round(overhead, 3),
        "heartbeating_pct_of_one_core": beating["cpu_pct"],
        "load_average": {"start": load_start, "end": load_average()},
    }


async def child_main(args: dict[str, Any]) -> None:
    require(args, ["namespace", "count", "interval", "window"])
    count, interval, window = int(args["count"]), float(args["interval"]), float(args["window"])
    names = Names(args["namespace"], SCENARIO)
    ids = [names.coordinator(i) for i in range(count)]
    admin: Any = aioredis.Redis.from_url(child_url())
    try:
        async with streambus.connect(child_url(), namespace=names.namespace) as bus, \
                anyio.create_task_group() as tg:
            waiters = StreambusWaiters("streambus", names, ids, bus)
            for coordinator in ids:
                tg.start_soon(_wait, bus, names.swarm, coordinator)
            with anyio.fail_after(120):
                await poll_until(waiters.armed, 0.01)
            await anyio.sleep(min(1.0, interval))  # let the start-up settle
            emit("window", phase="blocked", **await _window(admin, window, []))
            beaters: list[Heartbeater] = []
            for coordinator in ids:
                await tg.start(_heartbeat, bus.coordinator(names.swarm, coordinator), interval,
                               beaters)
            emit("window", phase="heartbeating", **await _window(admin, window, beaters))
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await admin.aclose()


async def _wait(bus: streambus.Bus, swarm: str, coordinator: str) -> None:
    await bus.wait_for(swarm, coordinator, "never", timeout=3600)


async def _heartbeat(coordinator: streambus.Coordinator, interval: float,
                     beaters: list[Heartbeater], *,
                     task_status: anyio.abc.TaskStatus[None]) -> None:
    async with coordinator.heartbeating(interval) as beater:
        beaters.append(beater)
        task_status.started()
        await anyio.sleep_forever()


async def _window(admin: Any, window: float, beaters: list[Heartbeater]) -> dict[str, Any]:
    beats_before = sum(b.beats for b in beaters)
    failures_before = sum(b.failures for b in beaters)
    server_before = await _server_cpu(admin)
    wall, cpu = time.perf_counter(), time.process_time()
    await anyio.sleep(window)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    server = await _server_cpu(admin) - server_before
    return {"cpu_s": round(cpu, 4), "wall_s": round(wall, 3),
            "cpu_pct": round(100 * cpu / wall, 3), "server_cpu_pct": round(100 * server / wall, 3),
            "beats": sum(b.beats for b in beaters) - beats_before,
            "failures": sum(b.failures for b in beaters) - failures_before}


async def _server_cpu(admin: Any) -> float:
    info = await admin.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
