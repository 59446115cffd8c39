"""The soak's publishers and its in-process coordinators.

Publishers send at a steady rate per swarm; every few signals a publish waits for the ACKs of
the whole swarm (``await_acks``), others return at once. A publish is retried with the same
signal id until the server answers (idempotent), so every publish ends with a stream id: those
are the *acknowledged* publishes the checker holds every coordinator to.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

import anyio
import anyio.abc

from benchmarks.chaos.coordinator import CoordinatorSpec, SoakCoordinator, end_marker
from benchmarks.chaos.plan import ACK_TIMEOUT_S, ACKS_EVERY, CHANNELS, PUBLISH_RATE, QUIET
from streambus import (
    AckTimeout,
    Bus,
    BusUnavailable,
    Durability,
    DurabilityNotReached,
    Published,
)

PUBLISH_GIVE_UP_S: Final = 120.0
QUIET_EVERY: Final = 20
"""One signal in 20 goes to the quiet channel."""


@dataclass
class PublishRecord:
    signal_id: str
    swarm: str
    channel: str
    durability: str
    await_acks: bool
    stream_id: str = ""
    durable: bool = False
    """The durability asked for was confirmed (always true for "none")."""
    acked_by: tuple[str, ...] = ()
    ack_timeout: bool = False
    retries: int = 0
    sent: float = 0.0
    returned: float = 0.0
    """Wall-clock times of the first attempt and of the answer."""


class Hub:
    """Publish notifications, for faults timed just after a publish returns."""

    def __init__(self) -> None:
        self._next: dict[tuple[str, str], anyio.Event] = {}
        self._any = anyio.Event()

    def published(self, swarm: str, channel: str) -> None:
        self._next.pop((swarm, channel), anyio.Event()).set()
        self._any.set()
        self._any = anyio.Event()

    async def next_publish(self, swarm: str | None = None, channel: str | None = None,
                           timeout: float = 2.0) -> None:
        if swarm is None or channel is None:
            event = self._any
        else:
            event = self._next.setdefault((swarm, channel), anyio.Event())
        with anyio.move_on_after(timeout):
            await event.wait()


@dataclass
class Publishers:
    bus: Bus
    topology: str
    seed: int
    coordinators: dict[str, list[str]]
    log_path: Path
    hub: Hub = field(default_factory=Hub)
    records: list[PublishRecord] = field(default_factory=list)
    in_flight: int = 0

    def _durability(self, rng: random.Random) -> Durability:
        if rng.random() < 0.5:
            return "none"
        return "fsync" if self.topology == "single" else "replicated"

    async def run(self, swarm: str, until: float) -> None:
        """Publish on ``swarm`` at the steady rate until the monotonic time ``until``."""
        rng = random.Random(f"{self.seed}:publisher:{swarm}")
        async with anyio.create_task_group() as tg:
            n = 0
            next_at = anyio.current_time()
            while next_at < until:
                n += 1
                channel = QUIET if n % QUIET_EVERY == 0 else rng.choice(CHANNELS)
                record = PublishRecord(f"{swarm}-s{n}", swarm, channel,
                                       self._durability(rng), n % ACKS_EVERY == 0)
                if record.await_acks:
                    tg.start_soon(self.publish, record)
                else:
                    await self.publish(record)
                next_at += 1 / PUBLISH_RATE
                await anyio.sleep(max(0.0, next_at - anyio.current_time()))

    async def publish_ends(self, swarms: Sequence[str], channels: Sequence[str]) -> None:
        """Each channel's end marker, once every fault is over."""
        strongest: Durability = "fsync" if self.topology == "single" else "replicated"
        for swarm in swarms:
            for channel in channels:
                await self.publish(PublishRecord(end_marker(channel), swarm, channel,
                                                 strongest, False))

    async def publish(self, record: PublishRecord) -> None:
        self.in_flight += 1
        record.sent = time.time()
        try:
            published = await self._until_answered(record)
            record.stream_id = published.stream_id
            record.returned = time.time()
            self.records.append(record)
            self.hub.published(record.swarm, record.channel)
            with self.log_path.open("a") as log:
                log.write(json.dumps(asdict(record)) + "\n")
        finally:
            self.in_flight -= 1

    async def _until_answered(self, record: PublishRecord) -> Published:
        durability: Durability = record.durability  # type: ignore[assignment]
        awaited = self.coordinators[record.swarm] if record.await_acks else ()
        with anyio.fail_after(PUBLISH_GIVE_UP_S):
            while True:
                try:
                    published = await self.bus.publish(
                        record.swarm, record.channel, {"n": record.signal_id},
                        sender="soak", signal_id=record.signal_id, await_acks=awaited,
                        ack_timeout=ACK_TIMEOUT_S, durability=durability)
                except BusUnavailable:
                    record.retries += 1
                    await anyio.sleep(0.05)
                    continue
                except DurabilityNotReached:
                    # Appended, not confirmed: ask again without a level to learn its id.
                    durability = "none"
                    record.retries += 1
                    continue
                except AckTimeout as exc:
                    record.ack_timeout = True
                    published = exc.published  # set by publish, which appended the signal
                record.durable = durability == record.durability
                record.acked_by = published.acked_by
                return published


class InProcess:
    """Coordinators in the soak's own process, on one bus (one dispatcher per swarm serves
    them all). Their fault is a cancelled wait, timed just after a publish on the channel
    the victim waits on, so the cancellation races the delivery."""

    def __init__(self, bus: Bus, specs: Sequence[CoordinatorSpec], journals: Path,
                 drain_flag: Path) -> None:
        self.loops = {spec.coordinator: SoakCoordinator(bus, spec, journals, drain_flag, 0)
                      for spec in specs}

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        async with anyio.create_task_group() as tg:
            for loop in self.loops.values():
                tg.start_soon(loop.run)
            task_status.started()

    async def cancel_one(self, rng: random.Random, pick: int, hub: Hub) -> str:
        names = sorted(self.loops)
        victim = self.loops[names[pick % len(names)]]
        channel = victim.channel
        if channel is not None:
            await hub.next_publish(victim.spec.swarm, channel, timeout=2.0)
        await anyio.sleep(rng.uniform(0.0, 0.004))
        cancelled = victim.cancel_wait()
        return (f"{victim.spec.coordinator} on {channel} "
                f"({'cancelled' if cancelled else 'was between waits'})")
