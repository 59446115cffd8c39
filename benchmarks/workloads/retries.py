"""Retry requests processed by one *blocked* coordinator: throughput and process memory.

The plan's stress test 3. The parent queues K retry requests for coordinator ``r0`` through
``bus.request_retry`` (32 at a time; that rate is reported too). Then a child process of its own
(so its CPU and RSS are the coordinator's alone) calls ``wait_for`` on a channel nobody signals,
with an ``on_retry`` handler that only counts: the coordinator stays blocked while its retry
consumer drains the queue. Throughput = K / (last handled - start of ``wait_for``); first
handled to last handled is reported too. The child then publishes a signal to end its own wait,
and the parent checks that nothing is left pending.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Final

import anyio

import streambus
from benchmarks.children import ChildGroup, child_url, emit, require
from benchmarks.common import load_average, rss_bytes
from benchmarks.session import Session

SWARM: Final = "bench-retries"
COORDINATOR: Final = "r0"
QUEUE_CONCURRENCY: Final = 32


async def run_retries(session: Session, requests: int) -> dict[str, Any]:
    load_start = load_average()
    queued_s = await _queue(session, requests)
    session.reporter.advance(f"queued {requests} requests in {queued_s:.2f} s "
                             f"({requests / queued_s:,.0f}/s)")
    async with ChildGroup(session.url) as group:
        child = await group.spawn("retries", {"namespace": session.namespace, "count": requests},
                                  name="retry coordinator")
        result = await child.expect("result", 300)
    keys = session.bus.keys(SWARM)
    pending = await session.admin.xpending(keys.retries(COORDINATOR), COORDINATOR)
    # Conservative: from the start of wait_for (begin_wait, group, claim) to the last request
    # handled. First-to-last alone would leave out the first batch's read.
    rate = result["processed"] / max(1e-9, result["start_to_last_s"])
    session.reporter.advance(f"processed {result['processed']} while blocked: {rate:,.0f}/s, "
                             f"RSS {result['rss_after'] / 1e6:.0f} MB")
    return {
        "workload": "retries", "title": "retry requests processed by one blocked coordinator",
        "requests": requests, "queue_s": round(queued_s, 3),
        "queue_rate_per_s": round(requests / queued_s), **result,
        "throughput_per_s": round(rate),
        "throughput_first_to_last_per_s": round(
            result["processed"] / max(1e-9, result["first_to_last_s"])),
        "pending_after": int(pending["pending"]),
        "load_average": {"start": load_start, "end": load_average()},
    }


async def _queue(session: Session, requests: int) -> float:
    started = time.perf_counter()
    next_index = iter(range(requests))

    async def worker() -> None:
        for index in next_index:
            await session.bus.request_retry(SWARM, COORDINATOR, reason="bench",
                                            blockers=[f"file{index % 7}.py:12"],
                                            request_id=f"q{index}", requested_by="validator",
                                            backlog_limit=requests + 1)

    async with anyio.create_task_group() as tg:
        for _ in range(QUEUE_CONCURRENCY):
            tg.start_soon(worker)
    return time.perf_counter() - started


async def child_main(args: dict[str, Any]) -> None:
    """The blocked coordinator (child process)."""
    require(args, ["namespace", "count"])
    count = int(args["count"])
    stamps: list[float] = []
    done = anyio.Event()

    def handle(_request: streambus.RetryRequest) -> None:
        stamps.append(time.perf_counter())
        if len(stamps) == count:
            done.set()

    async with streambus.connect(child_url(), namespace=args["namespace"]) as bus:
        rss_before = rss_bytes()
        cpu_before = time.process_time()
        coordinator = bus.coordinator(SWARM, COORDINATOR)
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: coordinator.wait_for("never", timeout=600, on_retry=handle))
            with anyio.fail_after(240):
                await done.wait()
            rss_after, cpu = rss_bytes(), time.process_time() - cpu_before
            await bus.publish(SWARM, "never", None, sender="bench")  # ends the wait
    emit("result", processed=len(stamps), first_to_last_s=round(stamps[-1] - stamps[0], 6),
         start_to_last_s=round(stamps[-1] - started, 6), rss_before=rss_before,
         rss_after=rss_after, peak_rss=_peak_rss(), cpu_s=round(cpu, 3), pid=os.getpid())


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0
