"""The watchdog: reports every coordinator whose heartbeats lapse, whether or not anyone waits.

Every ``interval`` it appends a ``CoordinatorDead`` event to the swarm's lifecycle stream for
each coordinator whose last beat (server time) is older than ``dead_after``, once per lapse.
Several watchdogs may run at once: the report is one atomic script, so none is doubled.

Run it as ``streambus watchdog SWARM [--dead-after 2m] [--interval 5s]``.
"""

from __future__ import annotations

import logging

import anyio
import anyio.abc

from streambus.backoff import Backoff
from streambus.bus import Bus
from streambus.errors import BusUnavailable

log = logging.getLogger(__name__)


class Watchdog:
    """Reports lapsed coordinators of one swarm until cancelled."""

    def __init__(self, bus: Bus, swarm: str, *, dead_after: float = 120.0,
                 interval: float = 5.0) -> None:
        self.bus = bus
        self.keys = bus.keys(swarm)
        self.dead_after_ms = round(dead_after * 1000)
        self.interval = interval
        self.reported: list[str] = []

    def __repr__(self) -> str:
        return (f"<Watchdog swarm={self.keys.swarm!r} dead_after={self.dead_after_ms}ms "
                f"reported={len(self.reported)}>")

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        await self.check()
        task_status.started()
        backoff, failed = Backoff(), False
        while True:
            # After a failed pass the next one follows the backoff, not a whole interval.
            await (backoff.sleep() if failed else anyio.sleep(self.interval))
            try:
                await self.check()
            except BusUnavailable as exc:
                log.warning("watchdog %s: %s", self.keys.swarm, exc)
                failed = True
            else:
                failed = False
                backoff.reset()

    async def check(self) -> list[str]:
        """One pass: report the coordinators that lapsed since the last pass."""
        dead = await self.bus.report_dead(self.keys.swarm, self.dead_after_ms / 1000)
        for coordinator in dead:
            log.error("swarm %s: coordinator %s is dead (no heartbeat for %.1f s)",
                      self.keys.swarm, coordinator, self.dead_after_ms / 1000)
        self.reported.extend(dead)
        return dead
