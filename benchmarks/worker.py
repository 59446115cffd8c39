"""A benchmark child process: ``python -m benchmarks.worker ROLE ARGS_JSON``.

Roles: ``fanout`` (waiters of a fan-out, driven round by round, below), and the one-shot
workloads that measure a process of their own (``retries``, ``heartbeat``, ``memory``, in
``benchmarks/workloads/``). The line protocol is in :mod:`benchmarks.children`.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio

import streambus
from benchmarks.children import child_url, commands, emit, require
from benchmarks.common import die_with_parent, poll_until
from benchmarks.systems import Names, RoundResult, Waiters, waiters_for

ARMED_POLL_S: Final = 0.001
ROLES: Final = {
    "retries": "benchmarks.workloads.retries",
    "heartbeat": "benchmarks.workloads.heartbeat",
    "memory": "benchmarks.workloads.memory",
}


async def fanout(args: dict[str, Any]) -> None:
    """Serve ``arm`` commands: every waiter of a system receives one round's signal.

    Per round: ``ready`` once every waiter is armed (as far as this process can tell), then
    ``done`` with every waiter's latency, this process's CPU time (arming, receiving) and its
    time in the garbage collector. ``close`` releases a system's connections.
    """
    require(args, ["namespace", "scenario", "first", "count"])
    names = Names(args["namespace"], args["scenario"])
    coordinators = [names.coordinator(i) for i in range(args["first"],
                                                        args["first"] + args["count"])]
    opened: dict[str, Waiters] = {}
    async with streambus.connect(child_url(), namespace=names.namespace) as bus:
        try:
            emit("hello", pid=os.getpid())
            with anyio.CancelScope() as scope:
                async for command in commands(scope):
                    system = command["system"]
                    if command["cmd"] == "close":
                        if (waiters := opened.pop(system, None)) is not None:
                            await waiters.aclose()
                        emit("closed", system=system)
                        continue
                    if system not in opened:
                        opened[system] = waiters_for(system, names, coordinators, bus)
                        await opened[system].open()
                        # Long-lived connections out of the collector's sight: one system's
                        # thousand clients must not slow another's full collections.
                        gc.collect()
                        gc.freeze()
                    await _round(opened[system], command["round"], float(command["timeout"]))
        finally:
            with anyio.CancelScope(shield=True):
                for waiters in opened.values():
                    await waiters.aclose()


class GcClock:
    """Time this process spends in the garbage collector (pauses every waiter alike)."""

    def __init__(self) -> None:
        self.total_s = 0.0
        self.full = 0
        self._began = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.total_s += time.perf_counter() - self._began
            self.full += info.get("generation") == 2


GC = GcClock()


async def _round(waiters: Waiters, round_: int, timeout: float) -> None:
    result = RoundResult()
    gc_before, full_before = GC.total_s, GC.full
    started_cpu = time.process_time()
    async with anyio.create_task_group() as tg:
        tg.start_soon(waiters.receive, round_, timeout, result)
        with anyio.move_on_after(timeout):
            await poll_until(waiters.armed, ARMED_POLL_S)
        armed_cpu, gc_armed, full_armed = time.process_time(), GC.total_s, GC.full
        emit("ready", system=waiters.system, round=round_)
    emit("done", system=waiters.system, round=round_, latencies_us=result.latencies_us,
         missed=len(waiters.coordinators) - len(result.latencies_us), stale=result.stale,
         arm_cpu_s=round(armed_cpu - started_cpu, 6),
         receive_cpu_s=round(time.process_time() - armed_cpu, 6),
         arm_gc_s=round(gc_armed - gc_before, 6), arm_gc_full=full_armed - full_before,
         gc_s=round(GC.total_s - gc_armed, 6), gc_full=GC.full - full_armed)


def main(argv: list[str]) -> int:
    die_with_parent()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    role, args = argv[0], json.loads(argv[1])
    runner: Callable[[dict[str, Any]], Awaitable[None]] = (
        fanout if role == "fanout" else importlib.import_module(ROLES[role]).child_main)
    try:
        anyio.run(runner, args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        with contextlib.suppress(Exception):
            emit("error", message=f"{type(exc).__name__}: {exc}")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
