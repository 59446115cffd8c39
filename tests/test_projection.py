"""The projector framework: position, catch-up, rebuild, shared work, poison."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest

from streambus.bus import Bus
from streambus.keys import SwarmKeys
from streambus.projection import Projector
from streambus.schema import AnyEvent, Signal

pytestmark = pytest.mark.anyio


class SignalLog:
    """Remembers every signal id it saw, per entry id: applying twice changes nothing."""

    name = "signal-log"

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}
        self.applications = 0

    def streams(self, keys: SwarmKeys) -> Sequence[str]:
        return [keys.channel("a"), keys.channel("b")]

    async def apply(self, keys: SwarmKeys, stream: str, entry_id: str, event: AnyEvent) -> None:
        self.applications += 1
        if isinstance(event, Signal):
            self.seen[f"{stream}/{entry_id}"] = event.signal_id

    async def reset(self, keys: SwarmKeys) -> None:
        self.seen.clear()


async def test_catch_up_then_resume_from_the_recorded_position(bus: Bus) -> None:
    keys = bus.keys("proj")
    for n in range(3):
        await bus.publish("proj", "a", n, signal_id=f"a{n}")
    await bus.publish("proj", "b", 0, signal_id="b0")
    first = SignalLog()
    assert await Projector(bus._store, keys, first).catch_up() == 4
    assert sorted(first.seen.values()) == ["a0", "a1", "a2", "b0"]
    await bus.publish("proj", "a", 3, signal_id="a3")
    restarted = SignalLog()  # a new process: its position is in Redis, not in memory
    assert await Projector(bus._store, keys, restarted).catch_up() == 1
    assert list(restarted.seen.values()) == ["a3"]


async def test_rebuild_replays_everything(bus: Bus) -> None:
    keys = bus.keys("rebuild")
    for n in range(5):
        await bus.publish("rebuild", "b", n, signal_id=f"s{n}")
    view = SignalLog()
    projector = Projector(bus._store, keys, view)
    await projector.catch_up()
    view.seen["stale"] = "left over"
    assert await projector.rebuild() == 5
    assert sorted(view.seen.values()) == [f"s{n}" for n in range(5)]


async def test_running_projector_follows_new_entries(bus: Bus) -> None:
    view = SignalLog()
    projector = Projector(bus._store, bus.keys("follow"), view, block_ms=200)
    async with anyio.create_task_group() as tg:
        await tg.start(projector.run)
        await bus.publish("follow", "a", "live", signal_id="live-1")
        with anyio.fail_after(5):
            while True:
                if "live-1" in view.seen.values():
                    break
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert projector.applied == 1


async def test_two_instances_share_the_work_without_double_applying(bus: Bus) -> None:
    keys = bus.keys("shared")
    for n in range(40):
        await bus.publish("shared", "a", n, signal_id=f"s{n}")
    one, two = SignalLog(), SignalLog()
    p1, p2 = Projector(bus._store, keys, one), Projector(bus._store, keys, two)
    async with anyio.create_task_group() as tg:
        tg.start_soon(p1.catch_up)
        tg.start_soon(p2.catch_up)
    assert one.applications + two.applications == 40
    assert set(one.seen.values()) | set(two.seen.values()) == {f"s{n}" for n in range(40)}
    assert not set(one.seen) & set(two.seen)


async def test_poison_is_dead_lettered_and_the_projector_goes_on(bus: Bus) -> None:
    keys = bus.keys("ppoison")
    await bus._store.raw().xadd(keys.channel("a"), {"e": b"not json"})
    await bus.publish("ppoison", "a", "fine", signal_id="fine")
    view = SignalLog()
    projector = Projector(bus._store, keys, view)
    await projector.catch_up()
    assert list(view.seen.values()) == ["fine"]
    assert projector.dead_lettered == 1
    assert len(await bus._store.read_range(keys.dead_letters)) == 1


class Picky(SignalLog):
    name = "picky"

    async def apply(self, keys: SwarmKeys, stream: str, entry_id: str, event: AnyEvent) -> None:
        if isinstance(event, Signal) and event.payload == "cursed":
            raise ValueError("cannot handle this one")
        await super().apply(keys, stream, entry_id, event)


async def test_an_event_the_projection_cannot_apply_is_dead_lettered(bus: Bus) -> None:
    keys = bus.keys("picky")
    await bus.publish("picky", "a", "cursed", signal_id="bad")
    await bus.publish("picky", "a", "fine", signal_id="good")
    view = Picky()
    projector = Projector(bus._store, keys, view)
    await projector.catch_up()
    assert list(view.seen.values()) == ["good"]
    [(_, fields)] = await bus._store.read_range(keys.dead_letters)
    assert fields is not None
    assert b"cannot handle this one" in fields[b"reason"]
    assert await Projector(bus._store, keys, Picky()).catch_up() == 0  # nothing left pending


async def _until_seen(view: SignalLog, signal_id: str) -> None:
    with anyio.fail_after(10):
        while True:
            if signal_id in view.seen.values():
                return
            await anyio.sleep(0.01)


async def test_projector_survives_losing_its_group_and_retires_on_exit(bus: Bus) -> None:
    keys = bus.keys("regroup")
    view = SignalLog()
    projector = Projector(bus._store, keys, view, block_ms=100)
    async with anyio.create_task_group() as tg:
        await tg.start(projector.run)
        await bus.publish("regroup", "a", 1, signal_id="before")
        await _until_seen(view, "before")
        for stream in view.streams(keys):  # as a restart without persistence would
            await bus._store.raw().xgroup_destroy(stream, projector.group)
        await bus.publish("regroup", "a", 2, signal_id="after")
        await _until_seen(view, "after")
        tg.cancel_scope.cancel()
    consumers = await bus._store.raw().xinfo_consumers(keys.channel("a"), projector.group)
    assert [c["name"] for c in consumers] == []  # it held nothing, so it removed itself
