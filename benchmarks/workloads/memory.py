"""Redis memory per 1,000 coordinators in steady state (the plan's NFR-2).

A child process of its own hosts N coordinators of one swarm. The parent reads the server's
``used_memory`` (``INFO memory``) three times: before (the child connected, nothing waiting),
once all N wait on a channel and have heartbeated once (``wait_for`` with a liveness policy),
and once they received one signal, acknowledged it and wait again (steady state). It reports
each delta per 1,000 coordinators, both as is and without client buffers
(``mem_clients_normal``), plus where the bytes are (``MEMORY USAGE`` of the swarm's keys by kind)
and what the heartbeat stream grows to over its retention (one hour) at this beat interval.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Final

import anyio

import streambus
from benchmarks.children import ChildGroup, child_url, commands, emit, require
from benchmarks.common import load_average, poll_until
from benchmarks.session import Session
from benchmarks.systems import Names, StreambusWaiters
from streambus.store import Limits

SCENARIO: Final = "memory"
CHANNEL: Final = "phase-done"
INTERVAL_S: Final = 5.0
MB: Final = 1_000_000


async def run_memory(session: Session, coordinators: int) -> dict[str, Any]:
    load_start = load_average()
    names = Names(session.namespace, f"{SCENARIO}{coordinators}")
    async with ChildGroup(session.url) as group:
        child = await group.spawn("memory", {"namespace": session.namespace,
                                             "scenario": names.scenario, "count": coordinators},
                                  name="memory child")
        await child.expect("connected", 120)
        before = await _memory(session)
        await child.send({"cmd": "arm"})
        await child.expect("armed", 300)
        waiting = await _memory(session)
        await session.bus.publish(names.swarm, CHANNEL, {"phase": 1}, sender="bench")
        await child.expect("armed", 300)
        steady = await _memory(session)
        breakdown = await _breakdown(session, names)
    per_1000 = {
        phase: {kind: round((after[kind] - before[kind]) / coordinators * 1000 / MB, 3)
                for kind in ("used_memory", "dataset")}
        for phase, after in (("waiting_and_beat_once", waiting), ("steady_state", steady))
    }
    keys = session.bus.keys(names.swarm)
    heartbeat = breakdown.get(_kind(keys.prefix, keys.heartbeats.encode()), {})
    per_beat = heartbeat.get("bytes", 0) / max(1, heartbeat.get("entries", 1))
    retention_beats = Limits().heartbeat_retention_ms / 1000 / INTERVAL_S
    projected = per_beat * retention_beats * 1000 / MB
    capped = {kind: round(v["bytes"] / max(1, v.get("entries", 1)) * Limits().events_maxlen / MB, 1)
              for kind, v in breakdown.items() if kind in ("events", "acks") and v.get("entries")}
    session.reporter.advance(
        f"{coordinators} coordinators: {per_1000['steady_state']['used_memory']:.2f} MB per "
        f"1,000 in steady state; heartbeat stream after 1 h: {projected:.1f} MB per 1,000")
    return {
        "workload": "memory", "title": f"Redis memory, {coordinators:,} coordinators",
        "coordinators": coordinators, "heartbeat_interval_s": INTERVAL_S,
        "used_memory": {"before": before, "waiting": waiting, "steady": steady},
        "mb_per_1000": per_1000, "by_key_kind": breakdown,
        "heartbeat_bytes_per_beat": round(per_beat, 1),
        "projected_heartbeat_stream_mb_per_1000_after_retention": round(projected, 2),
        "heartbeat_retention_s": Limits().heartbeat_retention_ms / 1000,
        "projected_mb_per_swarm_at_maxlen": capped, "events_maxlen": Limits().events_maxlen,
        "load_average": {"start": load_start, "end": load_average()},
    }


async def _memory(session: Session) -> dict[str, int]:
    info = await session.admin.info("memory")
    used = int(info["used_memory"])
    return {"used_memory": used, "dataset": used - int(info.get("mem_clients_normal", 0))}


async def _breakdown(session: Session, names: Names) -> dict[str, dict[str, int]]:
    """Bytes (``MEMORY USAGE ... SAMPLES 0``: exact) and keys of the swarm, by key kind."""
    prefix = session.bus.keys(names.swarm).prefix
    kinds: dict[str, dict[str, int]] = defaultdict(lambda: {"keys": 0, "bytes": 0})
    keys = [key async for key in session.admin.scan_iter(match=f"{_glob(prefix)}:*",
                                                         count=1000)]
    async with session.admin.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.memory_usage(key, samples=0)
        sizes = await pipe.execute()
    for key, size in zip(keys, sizes, strict=True):
        kinds[_kind(prefix, key)]["keys"] += 1
        kinds[_kind(prefix, key)]["bytes"] += int(size or 0)
    swarm_keys = session.bus.keys(names.swarm)
    for stream in (swarm_keys.heartbeats, swarm_keys.events, swarm_keys.acks):
        if (kind := _kind(prefix, stream.encode())) in kinds:
            kinds[kind]["entries"] = int(await session.admin.xlen(stream))
    return dict(sorted(kinds.items(), key=lambda item: -item[1]["bytes"]))


def _kind(prefix: str, key: bytes) -> str:
    """``ns:{swarm}:state:c1`` -> ``state``."""
    return key.decode()[len(prefix) + 1:].split(":", 1)[0]


def _glob(text: str) -> str:
    return re.sub(r"([*?\[\]])", r"\\\1", text)


async def child_main(args: dict[str, Any]) -> None:
    require(args, ["namespace", "scenario", "count"])
    names = Names(args["namespace"], args["scenario"])
    ids = [names.coordinator(i) for i in range(int(args["count"]))]
    liveness = streambus.Liveness(heartbeat_interval=INTERVAL_S)
    received: list[str] = []
    async with streambus.connect(child_url(), namespace=names.namespace) as bus, \
            anyio.create_task_group() as tg:
        waiters = StreambusWaiters("streambus", names, ids, bus)
        emit("connected")
        async for command in commands(tg.cancel_scope):
            if command["cmd"] != "arm":
                continue
            for coordinator in ids:
                tg.start_soon(_coordinate, bus.coordinator(names.swarm, coordinator,
                                                           liveness=liveness), received)
            with anyio.fail_after(300):
                # Every first beat is in before a waiter registers with the dispatcher.
                await poll_until(waiters.armed, 0.01)
                emit("armed")
                await poll_until(lambda: len(received) == len(ids) and waiters.armed(), 0.01)
                emit("armed")


async def _coordinate(coordinator: streambus.Coordinator, received: list[str]) -> None:
    """Wait, receive one signal, wait again (until cancelled)."""
    await coordinator.wait_for(CHANNEL, timeout=3600)
    received.append(coordinator.id)
    await coordinator.wait_for(CHANNEL, timeout=3600)
