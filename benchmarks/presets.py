"""The harness's sizes: ``ci`` (seconds; only proves it runs), ``small`` (about a minute) and
``full`` (a few minutes on 2 cores, every N of the issue)."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.fanout import FanoutSpec, SystemPlan
from benchmarks.systems import BLPOP, PUBSUB, STREAMBUS, STREAMBUS_ACK, XREADGROUP

POLL_FAST = "poll-100ms"
POLL_SLOW = "poll-5s"


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    fanouts: tuple[FanoutSpec, ...]
    loss_trials: int
    retry_requests: int
    heartbeat_coordinators: int
    heartbeat_interval_s: float
    heartbeat_window_s: float
    memory_coordinators: tuple[int, ...]
    cleanup_stale: int
    cleanup_active: int
    oneshot_runs: int = 15

    @property
    def steps(self) -> int:
        """Progress steps of the whole run (each workload's own, see the runner)."""
        return (sum(spec.steps for spec in self.fanouts) + 5 + 2 + 2
                + len(self.memory_coordinators) + 2 + 2)


def _plans(rounds: int, *, fast_poll: int, slow_poll: int, acks: bool = True,
           connected: bool = True) -> tuple[SystemPlan, ...]:
    plans = [SystemPlan(STREAMBUS, rounds)]
    if acks:
        plans.append(SystemPlan(STREAMBUS_ACK, rounds))
    if connected:
        plans += [SystemPlan(XREADGROUP, rounds), SystemPlan(BLPOP, rounds),
                  SystemPlan(PUBSUB, rounds)]
    if fast_poll:
        plans.append(SystemPlan(POLL_FAST, fast_poll))
    if slow_poll:
        # Each round takes up to 5 s: no warm-up round (its pool connects in the first ms).
        plans.append(SystemPlan(POLL_SLOW, slow_poll, warmup=0))
    return tuple(plans)


def _processes(n: int, plans: tuple[SystemPlan, ...]) -> FanoutSpec:
    return FanoutSpec("processes", f"{n:,} coordinator processes", n, 1, plans)


def _one_process(n: int, plans: tuple[SystemPlan, ...]) -> FanoutSpec:
    return FanoutSpec("one-process", f"{n:,} coordinators in one process", 1, n, plans)


def _many_processes(processes: int, per: int, plans: tuple[SystemPlan, ...],
                    notes: tuple[str, ...]) -> FanoutSpec:
    return FanoutSpec("many-processes", f"{processes * per:,} coordinators in {processes} "
                      "processes", processes, per, plans, notes)


_NO_FAST_POLL = ("GET polling every 100 ms is not run here: N waiters x 10 GET/s would "
                 "saturate the 2-core machine (it is measured at 100 and 1,000)",)

CI = Preset(
    name="ci",
    fanouts=(
        _processes(4, _plans(2, fast_poll=1, slow_poll=0)),
        _one_process(50, _plans(2, fast_poll=1, slow_poll=0)),
        _many_processes(2, 25, _plans(1, fast_poll=0, slow_poll=0, acks=False),
                        _NO_FAST_POLL),
    ),
    loss_trials=2, retry_requests=500, heartbeat_coordinators=50, heartbeat_interval_s=0.5,
    heartbeat_window_s=0.5, memory_coordinators=(50,), cleanup_stale=200, cleanup_active=10,
    oneshot_runs=3,
)

SMALL = Preset(
    name="small",
    fanouts=(
        _processes(100, _plans(5, fast_poll=3, slow_poll=0)),
        _one_process(1000, _plans(5, fast_poll=3, slow_poll=1)),
        _many_processes(4, 500, _plans(3, fast_poll=0, slow_poll=0, acks=False),
                        (*_NO_FAST_POLL, "small preset: 2,000 coordinators; the full preset "
                         "runs 10,000, and GET every 5 s")),
    ),
    loss_trials=10, retry_requests=20_000, heartbeat_coordinators=1000, heartbeat_interval_s=5.0,
    heartbeat_window_s=5.0, memory_coordinators=(1000,), cleanup_stale=10_000,
    cleanup_active=100,
)

FULL = Preset(
    name="full",
    fanouts=(
        _processes(100, _plans(20, fast_poll=10, slow_poll=2)),
        _one_process(1000, _plans(20, fast_poll=10, slow_poll=2)),
        _many_processes(8, 1250, _plans(5, fast_poll=0, slow_poll=1), _NO_FAST_POLL),
    ),
    loss_trials=30, retry_requests=100_000, heartbeat_coordinators=1000,
    heartbeat_interval_s=5.0, heartbeat_window_s=15.0, memory_coordinators=(1000, 10_000),
    cleanup_stale=10_000, cleanup_active=100, oneshot_runs=30,
)

PRESETS = {preset.name: preset for preset in (CI, SMALL, FULL)}
