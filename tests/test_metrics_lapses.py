"""The exporter's lapse gauges (``consumers/lapses.py``): waits nobody will end, and
coordinators a watchdog reported dead, read from a real server through a real scrape."""

from __future__ import annotations

from functools import partial

import anyio
import pytest

from consumers.watchdog import Watchdog
from streambus.bus import Bus
from streambus.liveness import Heartbeater
from tests.test_metrics import exporter, scrape, scrape_until, time_out

pytestmark = pytest.mark.anyio

STATES = ("waiting", "signaled", "timed_out", "peer_dead", "cancelled", "bus_unavailable",
          "failed", "idle")


async def test_a_wait_nobody_ended_shows_past_its_deadline(bus: Bus) -> None:
    swarm, keys = "lapse-d", bus.keys("lapse-d")
    # A coordinator began a 50 ms wait and died: nothing will ever end that wait.
    await bus._store.begin_wait(keys, "crashed", "ch", 50, 0)
    # One ended its own wait at its deadline; it started after "crashed", so once it returns
    # the server's clock is past both deadlines.
    await time_out(bus, swarm, "punctual", "ch", 0.05)
    async with exporter(bus, [swarm, "lapse-ok"]) as port, anyio.create_task_group() as tg:
        for name in (swarm, "lapse-ok"):  # one more waits, well within its deadline
            tg.start_soon(partial(bus.wait_for, name, "patient", "ch", timeout=60))
        got = await scrape_until(port, lambda s: all(
            s.value("blocking_coordinators", swarm=name, state="waiting") == want
            for name, want in ((swarm, 2), ("lapse-ok", 1))))
        tg.cancel_scope.cancel()

    assert got.families["blocking_coordinators_past_deadline"].type == "gauge"
    assert got.value("blocking_coordinators_past_deadline", swarm=swarm) == 1
    overdue = got.value("blocking_past_deadline_seconds_max", swarm=swarm)
    assert overdue is not None
    assert 0 < overdue < 30
    assert got.value("blocking_coordinators_past_deadline", swarm="lapse-ok") == 0
    assert got.value("blocking_past_deadline_seconds_max", swarm="lapse-ok") == 0


async def test_a_coordinator_reported_dead_counts_until_it_beats_again(bus: Bus) -> None:
    swarm, keys = "lapse-h", bus.keys("lapse-h")
    names = ("blocked", "done", "idle", "back")
    beaters = {name: Heartbeater(bus._store, keys, name, interval=1.0) for name in names}
    for beater in beaters.values():
        await beater.beat_once()
    await bus._store.begin_wait(keys, "blocked", "ch", 60_000, 0)  # dies while it waits
    async with anyio.create_task_group() as tg:  # "done" got its signal, then stopped beating
        tg.start_soon(partial(bus.wait_for, swarm, "done", "go", timeout=30))
        await bus.publish(swarm, "go", await_acks=["done"])

    async with exporter(bus, [swarm]) as port:
        before = await scrape(port)  # no watchdog has run: nobody is dead
        reported: set[str] = set()
        watchdog = Watchdog(bus, swarm, dead_after=0.05)
        with anyio.fail_after(10):
            while reported != set(names):  # each lapses 50 ms after its beat (server time)
                reported.update(await watchdog.check())
                await anyio.sleep(0.01)
        await beaters["back"].beat_once()  # alive again: no longer counted
        got = await scrape(port)

    for state in STATES:
        assert before.value("coordinators_reported_dead", swarm=swarm, state=state) == 0
    dead = {s.labels["state"]: s.value
            for s in got.families["coordinators_reported_dead"].samples}
    assert dead == {**dict.fromkeys(STATES, 0), "waiting": 1, "signaled": 1, "idle": 1}
    assert got.value("blocking_coordinators_past_deadline", swarm=swarm) == 0
