"""Cleanup of stale coordinators: K stale ones removed, the active ones untouched.

Runs only when ``streambus.cleanup`` offers ``async def cleanup(bus, *, swarm=None,
stale_after=600.0, dry_run=False)``; otherwise the report says "not available".

Set-up (not measured): K coordinators of one swarm begin a wait on a channel (state hash, index
entry, consumer group) and heartbeat once; every tenth also gets a retry request (its retry
stream). After ``stale_after`` passes, M more coordinators do the same: they are the live ones.
Measured: one dry run, then the cleanup, each timed around the call. Checked afterwards: how
many state keys and channel groups are left, and that every live coordinator kept its own.
"""

from __future__ import annotations

import importlib
import inspect
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import anyio

from benchmarks.common import load_average
from benchmarks.session import Session
from streambus.schema import Heartbeat, encode

SWARM: Final = "bench-cleanup"
CHANNEL: Final = "work"
STALE_AFTER_S: Final = 1.0
SETUP_CONCURRENCY: Final = 64
Cleanup = Callable[..., Awaitable[Any]]


def find_cleanup() -> Cleanup | str:
    """The library's cleanup function, or why it is not available."""
    try:
        module = importlib.import_module("streambus.cleanup")
    except ImportError as exc:
        return f"streambus.cleanup not importable ({exc})"
    function = getattr(module, "cleanup", None)
    if function is None or not inspect.iscoroutinefunction(function):
        return "streambus.cleanup has no async cleanup()"
    wanted = {"swarm", "stale_after", "dry_run"}
    if not wanted <= set(inspect.signature(function).parameters):
        return f"streambus.cleanup.cleanup() lacks {sorted(wanted)} keywords"
    return function  # type: ignore[no-any-return]


def skipped(reason: str) -> dict[str, Any]:
    return {"workload": "cleanup", "title": "cleanup of stale coordinators",
            "status": "not available", "reason": reason, "load_average": {
                "start": load_average(), "end": load_average()}}


async def run_cleanup(session: Session, stale: int, active: int) -> dict[str, Any]:
    function = find_cleanup()
    if isinstance(function, str):
        session.reporter.advance(f"skipped: {function}", steps=2)
        return skipped(function)
    load_start = load_average()
    stale_ids = [f"s{i}" for i in range(stale)]
    live_ids = [f"a{i}" for i in range(active)]
    started = time.perf_counter()
    await _coordinators(session, stale_ids, retry_every=10)
    setup_s = time.perf_counter() - started
    await anyio.sleep(STALE_AFTER_S + 0.3)
    await _coordinators(session, live_ids, retry_every=10)
    session.reporter.advance(f"set up {stale} stale + {active} live coordinators in "
                             f"{setup_s:.1f} s")
    dry_s, dry = await _timed(function(session.bus, swarm=SWARM, stale_after=STALE_AFTER_S,
                                       dry_run=True))
    real_s, report = await _timed(function(session.bus, swarm=SWARM, stale_after=STALE_AFTER_S))
    left = await _left(session, stale_ids, live_ids)
    removed = _removed(report)
    session.reporter.advance(f"removed {removed} in {real_s:.3f} s ({removed / real_s:,.0f}/s); "
                             f"live untouched: {left['live_untouched']}")
    return {
        "workload": "cleanup", "title": f"cleanup of {stale:,} stale coordinators",
        "status": "ok", "stale": stale, "active": active, "stale_after_s": STALE_AFTER_S,
        "setup_s": round(setup_s, 2), "dry_run_s": round(dry_s, 4), "cleanup_s": round(real_s, 4),
        "removed": removed, "dry_run_found": _removed(dry),
        "removed_per_s": round(removed / real_s) if real_s else None, **left,
        "report": _as_dict(report),
        "load_average": {"start": load_start, "end": load_average()},
    }


async def _coordinators(session: Session, ids: Sequence[str], *, retry_every: int) -> None:
    """Each one begins a wait (group, state, index) and beats once (liveness index)."""
    store, keys = session.bus._store, session.bus.keys(SWARM)  # seeding: below the API
    queue = iter(enumerate(ids))

    async def worker() -> None:
        for index, coordinator in queue:
            await store.begin_wait(keys, coordinator, CHANNEL, 600_000, 0)
            await store.beat(keys, coordinator,
                             encode(Heartbeat(coordinator=coordinator, interval_ms=5000)))
            if index % retry_every == 0:
                await session.bus.request_retry(SWARM, coordinator, reason="bench")

    async with anyio.create_task_group() as tg:
        for _ in range(SETUP_CONCURRENCY):
            tg.start_soon(worker)


async def _timed(call: Awaitable[Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await call
    return time.perf_counter() - started, result


async def _left(session: Session, stale_ids: list[str], live_ids: list[str]) -> dict[str, Any]:
    keys = session.bus.keys(SWARM)
    async with session.admin.pipeline(transaction=False) as pipe:
        for coordinator in [*stale_ids, *live_ids]:
            pipe.exists(keys.state(coordinator))
        exists = await pipe.execute()
    groups = {g["name"].decode() for g in await session.admin.xinfo_groups(keys.channel(CHANNEL))}
    stale_left = sum(exists[: len(stale_ids)])
    live_left = sum(exists[len(stale_ids):])
    return {
        "stale_state_left": stale_left, "stale_groups_left": len(groups & set(stale_ids)),
        "live_state_left": live_left, "live_groups_left": len(groups & set(live_ids)),
        "live_untouched": live_left == len(live_ids) and set(live_ids) <= groups,
    }


def _removed(report: Any) -> int:
    removed = getattr(report, "removed", None)
    if isinstance(removed, int):
        return removed
    if isinstance(removed, list | tuple):
        return len(removed)
    return -1


def _as_dict(report: Any) -> Any:
    as_dict = getattr(report, "as_dict", None)
    if callable(as_dict):
        doc = as_dict()
        for swarm in doc.get("swarms", []) if isinstance(doc, dict) else []:
            if isinstance(swarm, dict) and isinstance(swarm.get("removed"), list):
                swarm["removed"] = len(swarm["removed"])  # ids are not worth keeping
        return doc
    return repr(report)[:500]
