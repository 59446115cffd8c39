"""Waits nobody will end, and coordinators a watchdog found dead: read at scrape time.

Two things the state counts of :mod:`consumers.metrics` cannot show, both for alerting:

* **Waits past their deadline.** A coordinator ends its own wait at its deadline (it raises
  ``WaitTimeout`` and records ``timed_out``), so a wait still recorded ``waiting`` well after
  its deadline has nobody left to end it: its process died or hangs, or the bus was
  unreachable when the deadline came (it records the end once the bus is back). Deadlines and
  "now" are both server time (the state hash's ``deadline_ms``, the server's ``TIME``), so no
  clock skew reaches the comparison. A wait is past its deadline for a few milliseconds
  before its coordinator records the timeout: alert on how far past, not on the count.
* **Coordinators reported dead and still silent.** A watchdog (``streambus watchdog``) writes
  the last beat it judged lapsed into the swarm's ``reported-dead`` hash; a coordinator whose
  last beat in the ``alive`` index is still that one has not beaten since. "Dead" is the
  watchdog's ``--dead-after``: the exporter has no threshold of its own, and without a
  watchdog nobody is ever reported. A coordinator that finished and stopped beating is
  reported like one that crashed (a heartbeat stops the same way in both cases), so the
  gauge is split by the coordinator's recorded blocking state: a dead ``waiting`` one is
  blocking a swarm; ``idle`` means it never waited (it only heartbeats).

One read per swarm and scrape: :meth:`~streambus.views.Views.snapshot` (two round trips,
whatever the number of coordinators) and the ``reported-dead`` hash.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol

from prometheus_client.core import GaugeMetricFamily

from streambus.schema import BlockingState
from streambus.store import SwarmSnapshot
from streambus.views import Views

IDLE: Final = "idle"
"""The ``state`` label of a coordinator with no blocking state (it only heartbeats)."""
STATES: Final = (*(str(s) for s in BlockingState), IDLE)


@dataclass(frozen=True, slots=True)
class Lapses:
    """What one read of a swarm found."""

    past_deadline: int
    """Coordinators recorded ``waiting`` whose deadline has passed."""
    overdue_max_s: float
    """How far past its deadline the most overdue of them is (0 when none is)."""
    reported_dead: dict[str, int]
    """Coordinators reported dead and silent since, by recorded state (every state present)."""

    @classmethod
    def of(cls, snapshot: SwarmSnapshot, reported: dict[str, str]) -> Lapses:
        """Judge a snapshot; ``reported`` is the ``reported-dead`` hash (id -> beat ms)."""
        overdue = [snapshot.now_ms - int(row["deadline_ms"]) for row in snapshot.states
                   if row.get("state") == BlockingState.WAITING and "deadline_ms" in row]
        overdue = [ms for ms in overdue if ms > 0]
        state_of = {row.get("coordinator", ""): row.get("state", IDLE) for row in snapshot.states}
        dead = dict.fromkeys(STATES, 0)
        for coordinator, beat in reported.items():
            # Scores come back as floats from ZRANGE and as their string form from the script.
            if snapshot.beats.get(coordinator) == int(float(beat)):
                state = state_of.get(coordinator, IDLE)
                dead[state] = dead.get(state, 0) + 1
        return cls(len(overdue), max(overdue, default=0) / 1000, dead)

    def add_to(self, swarm: str, families: LapseFamilies) -> None:
        families.past_deadline.add_metric([swarm], self.past_deadline)
        families.overdue_max.add_metric([swarm], self.overdue_max_s)
        for state, count in sorted(self.reported_dead.items()):
            families.reported_dead.add_metric([swarm, state], count)


async def read_lapses(bus: Views, swarm: str) -> Lapses:
    """Read one swarm's lapses now."""
    snapshot = await bus.snapshot(swarm)
    reported = await bus.read_hash(bus.keys(swarm).reported_dead)
    return Lapses.of(snapshot, reported)


class LapseFamilies(Protocol):
    """Where :meth:`Lapses.add_to` writes: the families :func:`lapse_families` makes."""

    past_deadline: GaugeMetricFamily
    overdue_max: GaugeMetricFamily
    reported_dead: GaugeMetricFamily


def lapse_families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
    """New ``past_deadline``, ``overdue_max`` and ``reported_dead`` families, in that order."""
    return (
        GaugeMetricFamily(
            "blocking_coordinators_past_deadline", "Coordinators recorded waiting whose "
            "deadline (server time) has passed.", labels=["swarm"]),
        GaugeMetricFamily(
            "blocking_past_deadline_seconds_max", "How far past its deadline the most overdue "
            "waiting coordinator is (0 when none is).", labels=["swarm"]),
        GaugeMetricFamily(
            "coordinators_reported_dead", "Coordinators a watchdog reported dead that have not "
            "beaten since, by recorded blocking state (idle: none recorded).",
            labels=["swarm", "state"]),
    )


__all__ = ["LapseFamilies", "Lapses", "lapse_families", "read_lapses"]
