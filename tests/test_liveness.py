"""Heartbeats, dead peers, outages and budgets: the plan's scenarios 3 and 4, in real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import anyio.abc
import pytest

import streambus
from streambus import BusUnavailable, Delivery, Liveness, PeerDead, WaitTimeout
from streambus.bus import Bus
from streambus.liveness import Heartbeater
from tests.fakes import until
from tests.helpers import until_states
from tests.servers import ServerProcess

pytestmark = pytest.mark.anyio

FAST = Liveness(heartbeat_interval=0.2, dead_after=1.0, stale_checks=3)


@pytest.fixture
def heartbeat_process(redis_url: str, namespace: str, tmp_path: Path
                      ) -> Iterator[subprocess.Popen[bytes]]:
    """A peer coordinator beating every 200 ms from its own OS process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMBUS_")}
    with (tmp_path / "heartbeat.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "streambus", "heartbeat", "hb", "peer", "--interval", "200ms",
             "--redis-url", redis_url, "--namespace", namespace],
            env=env, stdout=log, stderr=log,
        )
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


async def _until_beating(bus: Bus, swarm: str, peer: str) -> int:
    """The peer's first recorded beat (server ms), waiting for it (bounded)."""
    with anyio.fail_after(10):
        while True:
            _, beats = await bus._store.last_beats(bus.keys(swarm), [peer])
            if beats[peer] is not None:
                return beats[peer]
            await anyio.sleep(0.02)


async def test_heartbeats_are_recorded_in_server_time(bus: Bus) -> None:
    coordinator = bus.coordinator("beats", "c", liveness=FAST)
    async with coordinator.heartbeating() as beater:
        first = await _until_beating(bus, "beats", "c")
        with anyio.fail_after(5):
            while True:  # four beats on the drift-free 200 ms schedule
                if len(await bus._store.read_range(bus.keys("beats").heartbeats)) >= 4:
                    break
                await anyio.sleep(0.05)
    now_ms, beats = await bus._store.last_beats(bus.keys("beats"), ["c"])
    last = beats["c"]
    assert last is not None
    assert last > first
    assert 0 <= now_ms - last < 5000
    entries = await bus._store.read_range(bus.keys("beats").heartbeats)
    assert len(entries) == beater.beats
    assert beater.failures == 0


async def test_scenario_3_waiter_ends_peer_dead_when_the_watched_process_is_killed(
    bus: Bus, heartbeat_process: subprocess.Popen[bytes]
) -> None:
    await _until_beating(bus, "hb", "peer")
    coordinator = bus.coordinator("hb", "waiter", liveness=FAST)
    async with anyio.create_task_group() as tg:
        caught: list[PeerDead] = []

        async def wait() -> None:
            with pytest.raises(PeerDead) as excinfo:
                await coordinator.wait_for("ch", timeout=30, watch=["peer"])
            caught.append(excinfo.value)

        tg.start_soon(wait)
        await until_states(bus, "hb", {"waiter": "waiting"})
        heartbeat_process.kill()  # kill -9: no goodbye, the beats just stop
        heartbeat_process.wait()
    assert list(caught[0].peers) == ["peer"]
    _, beats = await bus._store.last_beats(bus.keys("hb"), ["peer"])
    [row] = [r for r in await bus.status("hb") if r.coordinator == "waiter"]
    assert row.state == "peer_dead"
    last_beat = beats["peer"]
    assert last_beat is not None
    detected_after_s = (row.ended_ms - last_beat) / 1000
    # Server time on both ends: the beat's score and the recorded end of the wait.
    assert FAST.dead_after < detected_after_s <= FAST.dead_after + FAST.heartbeat_interval + 0.3


async def test_a_live_peer_is_never_judged_dead(
    bus: Bus, heartbeat_process: subprocess.Popen[bytes]
) -> None:
    await _until_beating(bus, "hb", "peer")
    coordinator = bus.coordinator("hb", "waiter", liveness=FAST)
    with pytest.raises(WaitTimeout):
        await coordinator.wait_for("ch", timeout=2.5, watch=["peer"])
    assert heartbeat_process.poll() is None


async def test_a_peer_that_never_beat_is_dead_after_dead_after(bus: Bus) -> None:
    coordinator = bus.coordinator("ghost", "waiter", liveness=FAST)
    started = anyio.current_time()
    with pytest.raises(PeerDead):
        await coordinator.wait_for("ch", timeout=30, watch=["never-started"])
    assert anyio.current_time() - started >= FAST.dead_after


@pytest.fixture
async def fault_bus(own_server: ServerProcess, namespace: str) -> AsyncIterator[Bus]:
    async with streambus.connect(own_server.url, namespace=namespace, block_ms=200) as bus:
        yield bus


async def test_being_cut_off_does_not_make_a_live_peer_look_dead(
    own_server: ServerProcess, fault_bus: Bus
) -> None:
    """The waiter and the peer both lose the server for longer than dead_after."""
    peer = fault_bus.coordinator("cut", "peer", liveness=FAST)
    waiter = fault_bus.coordinator("cut", "waiter", liveness=FAST)
    got: list[Delivery] = []
    async with peer.heartbeating(), anyio.create_task_group() as tg:
        await _until_beating(fault_bus, "cut", "peer")

        async def wait() -> None:
            got.append(await waiter.wait_for("ch", timeout=30, watch=["peer"]))

        tg.start_soon(wait)
        await until_states(fault_bus, "cut", {"waiter": "waiting"})
        own_server.freeze()
        await anyio.sleep(FAST.dead_after * 1.5)  # the outage itself
        own_server.thaw()
        # Two full dead_after spans of fresh server time with the peer beating again.
        await anyio.sleep(FAST.dead_after * 2)
        published = await fault_bus.publish("cut", "ch", "still alive")
    assert [d.signal.signal_id for d in got] == [published.signal_id]


async def test_wait_ends_bus_unavailable_after_the_reconnect_budget(
    own_server: ServerProcess, fault_bus: Bus
) -> None:
    async with anyio.create_task_group() as tg:
        caught: list[BaseException] = []

        async def wait() -> None:
            try:
                await fault_bus.wait_for("gone", "c", "ch", timeout=30, reconnect_budget=0.5)
            except BusUnavailable as exc:
                caught.append(exc)

        tg.start_soon(wait)
        await until_states(fault_bus, "gone", {"c": "waiting"})
        own_server.kill()
        killed_at = anyio.current_time()
    assert caught, "the wait should have ended with BusUnavailable"
    assert "reconnect budget" in str(caught[0])
    assert anyio.current_time() - killed_at < 5


async def test_reconnects_within_a_second_of_the_server_returning(
    own_server: ServerProcess, fault_bus: Bus
) -> None:
    """Plan scenario 4: after an outage the first signal arrives well inside a second."""
    got: list[Delivery] = []
    async with anyio.create_task_group() as tg:
        async def wait() -> None:
            got.append(await fault_bus.wait_for("back", "c", "ch", timeout=30))

        tg.start_soon(wait)
        await until_states(fault_bus, "back", {"c": "waiting"})
        own_server.kill()
        await anyio.sleep(1.5)  # the outage itself: long enough for backoff to reach its cap
        own_server.start()
        returned_at = anyio.current_time()
        await fault_bus.publish("back", "ch", "welcome back")
    assert got
    assert anyio.current_time() - returned_at < 1.5


async def test_watchdog_reports_a_lapsed_coordinator_once(bus: Bus) -> None:
    from consumers.watchdog import Watchdog
    from streambus.schema import CoordinatorDead, decode_fields

    short = Liveness(heartbeat_interval=0.1, dead_after=0.5)
    async with bus.coordinator("wd", "mortal", liveness=short).heartbeating():
        await _until_beating(bus, "wd", "mortal")
    first = Watchdog(bus, "wd", dead_after=0.5, interval=0.1)
    second = Watchdog(bus, "wd", dead_after=0.5, interval=0.1)
    assert await first.check() == []  # it only just stopped beating
    with anyio.fail_after(5):
        while True:
            if await first.check() or await second.check():
                break
            await anyio.sleep(0.05)
    assert await first.check() == []
    assert await second.check() == []
    assert first.reported + second.reported == ["mortal"]
    events = [decode_fields(f) for _, f in await bus._store.read_range(bus.keys("wd").events)]
    dead = [e for e in events if isinstance(e, CoordinatorDead)]
    assert [e.coordinator for e in dead] == ["mortal"]
    assert dead[0].detected_ms - dead[0].last_beat_ms > 500


async def test_blocking_view_shows_who_blocks_on_what_since_when(bus: Bus) -> None:
    peer = bus.coordinator("view", "peer", liveness=FAST)
    waiter = bus.coordinator("view", "waiter", liveness=FAST)
    async with peer.heartbeating(), anyio.create_task_group() as tg:
        tg.start_soon(lambda: waiter.wait_for("loop2-done", timeout=60, watch=["peer"]))
        await until_states(bus, "view", {"waiter": "waiting"})
        await bus.request_retry("view", "waiter", reason="redo")  # no handler: stays pending
        await _until_beating(bus, "view", "waiter")
        rows = {row.coordinator: row for row in await bus.status("view")}
        tg.cancel_scope.cancel()
    now_s = await bus._store.time_ms() / 1000
    row = rows["waiter"]
    assert row.state == "waiting"
    assert row.channel == "loop2-done"
    assert row.since == row.started_ms / 1000
    assert row.deadline - row.since == 60
    assert 0 <= row.last_heartbeat_age_s < 5
    assert row.watches == ["peer"]
    assert row.retries_pending == 1
    assert abs(now_s - row.since) < 10
    assert rows["peer"].state == "idle"  # beats, never waited
    assert rows["peer"].last_heartbeat_age_s is not None


async def test_many_coordinators_of_a_process_beat_in_few_calls(bus: Bus) -> None:
    names = [f"c{n}" for n in range(200)]
    keys = bus.keys("herd")
    beaters = [Heartbeater(bus._store, keys, name, FAST.heartbeat_interval,
                           batcher=bus._runtime.beats) for name in names]
    async with anyio.create_task_group() as tg:
        for beater in beaters:
            await tg.start(beater.run)  # one after another, as separate coordinators start
        with anyio.fail_after(10):
            while True:  # three more beats each, on the shared grid
                if min(beater.beats for beater in beaters) >= 4:
                    break
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    _, beats = await bus._store.last_beats(keys, names)
    assert all(beat is not None for beat in beats.values())
    assert all(beater.failures == 0 for beater in beaters)
    later_beats = sum(beater.beats for beater in beaters) - len(names)
    later_calls = bus._runtime.beats.calls - len(names)  # the first beats went out one by one
    assert later_calls < later_beats / 20


async def test_a_roster_keeps_beating_when_its_leader_leaves(bus: Bus) -> None:
    """The coordinators of a process beat from one task; when that coordinator stops, another
    takes over on the same schedule, and a stopped one is beaten for no more."""
    keys = bus.keys("roster")
    beaters = [Heartbeater(bus._store, keys, f"r{n}", FAST.heartbeat_interval,
                           batcher=bus._runtime.beats) for n in range(3)]
    scopes = [anyio.CancelScope() for _ in beaters]

    async def run(beater: Heartbeater, scope: anyio.CancelScope, *,
                  task_status: anyio.abc.TaskStatus[None]) -> None:
        with scope:
            await beater.run(task_status=task_status)

    async with anyio.create_task_group() as tg:
        for beater, scope in zip(beaters, scopes, strict=True):
            await tg.start(run, beater, scope)
        await until(lambda: min(b.beats for b in beaters) >= 2, within=10)
        scopes[0].cancel()  # the first to join leads the roster
        left_with = beaters[0].beats
        after = [b.beats for b in beaters[1:]]
        await until(lambda: all(b.beats >= a + 2 for b, a in zip(beaters[1:], after, strict=True)),
                    within=10)
        tg.cancel_scope.cancel()
    assert beaters[0].beats == left_with
    assert all(b.failures == 0 for b in beaters)


async def test_a_swarm_that_only_beats_is_listed(bus: Bus) -> None:
    """A coordinator that heartbeats and never waited makes its swarm known to ``status``
    (and the dashboard), as one that waits or a channel does."""
    async with bus.coordinator("beats-only", "b").heartbeating(0.05) as beater:
        await beater.beat_once()
        assert "beats-only" in await bus.swarm_ids()
        [summary] = [s for s in await bus.swarms() if s.swarm == "beats-only"]
        assert summary.swarm == "beats-only"
