"""What a soak runs, all decided up front from ``--seed``: the swarms, their coordinators (in
which process, which style, which clock), the publish mix and the schedule of faults.

The schedule is a list of (time, kind, target, parameter seed): the kinds come round in
shuffled rounds, so a short soak still injects every enabled kind once; each fault draws its
durations from its own seeded generator. Only the moment a fault lands relative to the
workload (the machine's timing) varies between two runs of one seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from benchmarks.chaos.coordinator import CoordinatorSpec
from benchmarks.chaos.fleet import WorkerSpec

SWARMS: Final = 3
CHANNELS: Final = ("a", "b", "c")
QUIET: Final = "quiet"
PUBLISH_RATE: Final = 2.0
"""Signals per second per swarm (on the busy channels; the quiet one gets a few)."""
ACKS_EVERY: Final = 4
"""Every 4th publish waits for the ACKs of the whole swarm."""
ACK_TIMEOUT_S: Final = 10.0
WARMUP_S: Final = 3.0
MEAN_GAP_S: Final = 3.0
"""Mean time between two fault starts (a fault in progress delays the next)."""
SKEWS: Final = ("+300s", "-300s", "+1d")

PROCESS_FAULTS: Final = ("coordinator_kill", "coordinator_freeze")
IN_PROCESS_FAULTS: Final = ("wait_cancel",)
LINK_FAULT: Final = "link_cut"


@dataclass(frozen=True, slots=True)
class FaultEvent:
    at: float
    kind: str
    pick: int
    """Chooses the target among the candidates (modulo their number)."""
    seed: int


@dataclass(frozen=True)
class SoakPlan:
    seed: int
    topology: str
    duration_s: float
    swarms: tuple[str, ...]
    workers: tuple[WorkerSpec, ...]
    in_process: tuple[CoordinatorSpec, ...]
    schedule: tuple[FaultEvent, ...]
    kinds: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)

    def coordinators_of(self, swarm: str) -> list[str]:
        ids = [c.coordinator for w in self.workers for c in w.coordinators if w.swarm == swarm]
        return ids + [c.coordinator for c in self.in_process if c.swarm == swarm]

    @property
    def all_coordinators(self) -> list[str]:
        return [c for swarm in self.swarms for c in self.coordinators_of(swarm)]

    def workers_of(self, coordinator: str) -> str | None:
        return next((w.name for w in self.workers
                     for c in w.coordinators if c.coordinator == coordinator), None)

    def style_of(self, coordinator: str) -> str:
        specs = [*(c for w in self.workers for c in w.coordinators), *self.in_process]
        return next(c.style for c in specs if c.coordinator == coordinator)


def make_plan(seed: int, topology: str, minutes: float, server_faults: Sequence[str],
              skipped: dict[str, str]) -> SoakPlan:
    """The plan of one soak. ``skipped`` names the kinds this machine cannot run, with why."""
    swarms = tuple(f"sw{i}" for i in range(SWARMS))
    workers: list[WorkerSpec] = []
    in_process: list[CoordinatorSpec] = []
    for index, swarm in enumerate(swarms):
        def spec(n: int, style: str, swarm: str = swarm) -> CoordinatorSpec:
            return CoordinatorSpec(swarm=swarm, coordinator=f"{swarm}-c{n}", style=style,
                                   channels=CHANNELS, quiet=QUIET, seed=seed)

        workers += [
            WorkerSpec(f"{swarm}-w0", swarm, (spec(0, "auto"), spec(1, "numbered"))),
            WorkerSpec(f"{swarm}-w1", swarm, (spec(2, "numbered"),),
                       skew=None if "clock_skew" in skipped else SKEWS[index % len(SKEWS)]),
            WorkerSpec(f"{swarm}-w2", swarm, (spec(3, "auto"),),
                       in_netns=LINK_FAULT not in skipped),
        ]
        in_process += [spec(4, "numbered"), spec(5, "numbered")]
    kinds = [*PROCESS_FAULTS, *IN_PROCESS_FAULTS, *server_faults]
    if LINK_FAULT not in skipped:
        kinds.append(LINK_FAULT)
    duration_s = minutes * 60.0
    return SoakPlan(seed, topology, duration_s, swarms, tuple(workers), tuple(in_process),
                    tuple(_schedule(random.Random(seed), kinds, duration_s)), tuple(kinds),
                    dict(skipped))


def _schedule(rng: random.Random, kinds: list[str], duration_s: float) -> list[FaultEvent]:
    events: list[FaultEvent] = []
    at = WARMUP_S
    # A short soak packs its faults closer, so that every kind still comes once.
    gap = min(MEAN_GAP_S, (duration_s - WARMUP_S) / (2 * len(kinds)))
    round_: list[str] = []
    while True:
        at += rng.uniform(0.5, 1.5) * gap
        if at >= duration_s and len({e.kind for e in events}) == len(kinds):
            return events
        if not round_:
            round_ = rng.sample(kinds, len(kinds))
        events.append(FaultEvent(at, round_.pop(), rng.randrange(1 << 30), rng.randrange(1 << 62)))
