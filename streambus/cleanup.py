"""Cleanup: remove what dead coordinators left behind, never touching a live one.

A coordinator is stale when, in server time:

* it heartbeats and its last beat is older than ``stale_after``, or
* it never beat, is waiting, and its deadline passed more than ``stale_after`` ago, or
* it never beat, is not waiting, and its last state change is older than ``stale_after``.

For each, one atomic script (which re-checks staleness when it runs, so a coordinator that
came back meanwhile survives) deletes its blocking state, its entries in the coordinator and
liveness indexes, its consumer group on every channel of the swarm (and with it its pending
entries), and its retry stream and backlog. Dedupe records and ACK hashes need no cleanup: they
expire on their own after 24 h. Two cleanups may run at once (cron and a systemd timer): each
removal is atomic and idempotent, so the second finds nothing left to do.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio

from streambus.bus import Bus

log = logging.getLogger(__name__)

DEFAULT_STALE_AFTER_S: Final = 600.0


@dataclass
class SwarmCleanup:
    """What one swarm's cleanup removed (or, in a dry run, would remove)."""

    swarm: str
    removed: list[str] = field(default_factory=list)
    groups_destroyed: int = 0
    retry_streams_removed: int = 0


@dataclass
class CleanupReport:
    """What a cleanup run did."""

    dry_run: bool
    stale_after_s: float
    swarms: list[SwarmCleanup] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def removed(self) -> int:
        return sum(len(s.removed) for s in self.swarms)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "removed_total": self.removed}


async def cleanup(bus: Bus, *, swarm: str | None = None,
                  stale_after: float = DEFAULT_STALE_AFTER_S, dry_run: bool = False,
                  ) -> CleanupReport:
    """Clean one swarm, or every swarm of the bus's namespace."""
    started = time.perf_counter()
    report = CleanupReport(dry_run=dry_run, stale_after_s=stale_after)
    stale_ms = round(stale_after * 1000)
    for name in [swarm] if swarm is not None else await swarms(bus):
        report.swarms.append(await _clean_swarm(bus, name, stale_ms, dry_run))
    report.elapsed_s = time.perf_counter() - started
    log.info("cleanup%s removed %d coordinators in %.3f s", " (dry run)" if dry_run else "",
             report.removed, report.elapsed_s)
    return report


async def swarms(bus: Bus) -> list[str]:
    """Every swarm of the namespace that has a coordinator index."""
    return await bus.swarm_ids()


async def _clean_swarm(bus: Bus, swarm: str, stale_ms: int, dry_run: bool) -> SwarmCleanup:
    keys = bus.keys(swarm)
    candidates = await bus._store.stale_candidates(keys, stale_ms)
    result = SwarmCleanup(swarm)
    if not candidates:
        return result
    channels = sorted(await bus._store.scan(keys.channel_pattern, type_="stream"))
    removed, groups, retries = await bus._store.remove_stale(
        keys, channels, candidates, stale_ms, dry_run=dry_run)
    result.removed, result.groups_destroyed, result.retry_streams_removed = (
        removed, groups, retries)
    return result


def append_log(path: Path, report: CleanupReport) -> None:
    """Append the run to the cleanup log (JSON lines), creating its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"ts": time.time(), **report.as_dict()}, separators=(",", ":"))
    with path.open("a") as handle:
        handle.write(line + "\n")


async def append_log_async(path: Path, report: CleanupReport) -> None:
    await anyio.to_thread.run_sync(append_log, path, report)
