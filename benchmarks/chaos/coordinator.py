"""One soak coordinator: wait, journal what the wait returned, wait again, forever.

The same loop runs in the worker processes (killed, frozen, clock-skewed, cut off) and in the
soak's own process (where the fault is a cancelled wait). Two styles, as real coordinators:

* ``numbered``: the coordinator numbers its iterations and, after a restart or a cancelled
  wait, waits again with the same iteration on the same channel. A signal that the lost wait
  received (and acknowledged) is then returned again: nothing acknowledged may go missing.
* ``auto``: ``iteration=0`` (the bus numbers them). A process killed between the ACK and its
  journal write loses that signal from its journal: the honest window the checker allows.

Channels are chosen from a seeded generator per coordinator and incarnation; ``quiet`` (rarely
published on) makes waits time out. Once the drain flag file exists, the coordinator waits on
each channel in turn until it has received that channel's end marker.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio

from benchmarks.chaos.journal import Journal, read_journal, resume_point
from streambus import Bus, BusUnavailable, StreambusError, WaitTimeout

QUIET_SHARE: Final = 0.05
TIMEOUT_RANGE_S: Final = (0.3, 1.5)
DRAIN_TIMEOUT_S: Final = 30.0
RECONNECT_BUDGET_S: Final = 120.0
END_PREFIX: Final = "end-"


def end_marker(channel: str) -> str:
    """The signal id of a channel's last signal, published once the faults are over."""
    return f"{END_PREFIX}{channel}"


@dataclass(frozen=True, slots=True)
class CoordinatorSpec:
    swarm: str
    coordinator: str
    style: str  # "numbered" | "auto"
    channels: tuple[str, ...]
    quiet: str
    seed: int


class SoakCoordinator:
    """The loop of one coordinator (see the module docstring)."""

    def __init__(self, bus: Bus, spec: CoordinatorSpec, journal_dir: Path, drain_flag: Path,
                 incarnation: int) -> None:
        self.bus = bus
        self.spec = spec
        self.handle = bus.coordinator(spec.swarm, spec.coordinator)
        path = journal_dir / f"{spec.coordinator}.jsonl"
        history = read_journal(path)
        self.resume = resume_point(history)
        self.journal = Journal(path, spec.coordinator, incarnation)
        self.drain_flag = drain_flag
        self.rng = random.Random(f"{spec.seed}:{spec.coordinator}:{incarnation}")
        self.next_iteration = self.resume.next_iteration
        self.ended = {line["ch"] for line in history
                      if line.kind == "recv" and line["sig"] == end_marker(line["ch"])}
        self.wait_scope: anyio.CancelScope | None = None
        self.channel: str | None = None
        self.journal.write("start", incarnation=incarnation, style=spec.style)

    def __repr__(self) -> str:
        return f"<SoakCoordinator {self.spec.coordinator!r} on {self.channel!r}>"

    @property
    def all_channels(self) -> Sequence[str]:
        return (*self.spec.channels, self.spec.quiet)

    def cancel_wait(self) -> bool:
        """Cancel the wait in progress (the in-process fault); False when none is."""
        if self.wait_scope is None:
            return False
        self.wait_scope.cancel()
        return True

    async def run(self) -> None:
        channel, iteration = self.resume.channel, self.resume.iteration
        while True:
            if channel is None:
                channel, iteration = self._next_wait()
            if channel is None:
                self.journal.write("drained")
                await anyio.sleep_forever()
                return
            if not await self._wait_once(channel, iteration, self._timeout()):
                channel = None

    def _next_wait(self) -> tuple[str | None, int]:
        if self.drain_flag.exists():
            todo = [c for c in self.all_channels if c not in self.ended]
            if not todo:
                return None, 0
            channel = todo[0]
        elif self.rng.random() < QUIET_SHARE:
            channel = self.spec.quiet
        else:
            channel = self.rng.choice(self.spec.channels)
        iteration = 0
        if self.spec.style == "numbered":
            iteration = self.next_iteration
            self.next_iteration += 1
        return channel, iteration

    def _timeout(self) -> float:
        if self.drain_flag.exists():
            return DRAIN_TIMEOUT_S
        return self.rng.uniform(*TIMEOUT_RANGE_S)

    async def _server_ms(self) -> int:
        while True:
            try:
                return await self.bus.server_time_ms()
            except BusUnavailable:
                await anyio.sleep(0.05)

    async def _wait_once(self, channel: str, iteration: int, timeout: float) -> bool:
        """One wait; True when the same wait must be waited for again (same iteration)."""
        self.channel = channel
        started_ms = await self._server_ms()
        self.journal.write("begin", ch=channel, it=iteration, t0=started_ms,
                           timeout_ms=round(timeout * 1000))
        with anyio.CancelScope() as scope:
            self.wait_scope = scope
            try:
                got = await self.handle.wait_for(channel, timeout=timeout, iteration=iteration,
                                                 reconnect_budget=RECONNECT_BUDGET_S)
            except WaitTimeout as exc:
                self.journal.write("timeout", ch=channel, it=iteration,
                                   deadline=exc.deadline_ms, now=await self._server_ms())
                return False
            except BusUnavailable as exc:
                self.journal.write("unavailable", ch=channel, it=iteration, err=str(exc))
                return self.spec.style == "numbered"
            except StreambusError as exc:
                self.journal.write("error", ch=channel, it=iteration, err=repr(exc))
                await anyio.sleep(0.1)
                return self.spec.style == "numbered"
            finally:
                self.wait_scope = None
        if scope.cancelled_caught:
            self.journal.write("cancelled", ch=channel, it=iteration)
            return self.spec.style == "numbered"
        self.journal.write("recv", ch=channel, it=got.iteration, sig=got.signal.signal_id,
                           sid=got.stream_id, ack=got.ack_id)
        if got.signal.signal_id == end_marker(channel):
            self.ended.add(channel)
        return False
