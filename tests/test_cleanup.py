"""Cleanup of stale coordinators: what goes, what stays, dry runs, concurrent runs, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from streambus.bus import Bus
from streambus.cleanup import cleanup
from streambus.schema import Heartbeat, encode
from tests.clitools import Cli, one_json_object

pytestmark = pytest.mark.anyio
HOUR_MS = 3600 * 1000


async def _coordinator(bus: Bus, swarm: str, name: str, *, beats: bool, age_ms: int,
                       waiting: bool = False) -> None:
    """A coordinator as the real API leaves it, then aged by ``age_ms`` (as if long dead)."""
    keys = bus.keys(swarm)
    start = await bus._store.begin_wait(keys, name, "ch", 60_000 if waiting else 1, 0)
    if not waiting:
        await bus._store.end_wait(keys, name, "ch", start.iteration, "timed_out",
                                 b'{"type":"blocking_ended","outcome":"timeout"}')
    await bus.request_retry(swarm, name, reason="left behind")
    raw = bus._store.raw()
    then = start.now_ms - age_ms
    if beats:
        await bus._store.beat(keys, name, encode(Heartbeat(coordinator=name)))
        await raw.zadd(keys.alive, {name: then})
    await raw.zadd(keys.coordinators, {name: then})
    await raw.hset(keys.state(name), mapping={"updated_ms": then})
    if waiting:
        await raw.hset(keys.state(name), mapping={"deadline_ms": then + 1})


async def test_stale_coordinators_go_and_live_ones_stay(bus: Bus) -> None:
    await _coordinator(bus, "cl", "dead-beater", beats=True, age_ms=HOUR_MS)
    await _coordinator(bus, "cl", "dead-silent", beats=False, age_ms=HOUR_MS)
    await _coordinator(bus, "cl", "dead-waiter", beats=False, age_ms=HOUR_MS, waiting=True)
    await _coordinator(bus, "cl", "live-beater", beats=True, age_ms=0)
    await _coordinator(bus, "cl", "fresh-silent", beats=False, age_ms=0)
    # Beats decide for a beater, even if its state is old.
    await _coordinator(bus, "cl", "old-state-fresh-beat", beats=True, age_ms=HOUR_MS)
    await bus._store.raw().zadd(bus.keys("cl").alive,
                                {"old-state-fresh-beat": await bus._store.time_ms()})
    keys = bus.keys("cl")
    report = await cleanup(bus, swarm="cl", stale_after=600)
    [swarm] = report.swarms
    assert sorted(swarm.removed) == ["dead-beater", "dead-silent", "dead-waiter"]
    assert swarm.groups_destroyed == 3
    assert swarm.retry_streams_removed == 3
    raw = bus._store.raw()
    survivors = {row.coordinator for row in await bus.status("cl")}
    assert survivors == {"live-beater", "fresh-silent", "old-state-fresh-beat"}
    groups = {g["name"].decode() for g in await raw.xinfo_groups(keys.channel("ch"))}
    assert groups == survivors
    for name in ("dead-beater", "dead-silent", "dead-waiter"):
        assert await raw.exists(keys.state(name), keys.retries(name)) == 0
        assert await raw.zscore(keys.alive, name) is None
    assert await raw.exists(keys.retries("live-beater")) == 1


async def test_dry_run_reports_and_removes_nothing(bus: Bus) -> None:
    await _coordinator(bus, "dry", "dead", beats=True, age_ms=HOUR_MS)
    report = await cleanup(bus, swarm="dry", stale_after=600, dry_run=True)
    assert report.swarms[0].removed == ["dead"]
    assert [row.coordinator for row in await bus.status("dry")] == ["dead"]


async def test_every_swarm_of_the_namespace_is_cleaned(bus: Bus) -> None:
    for swarm in ("one", "two"):
        await _coordinator(bus, swarm, "dead", beats=False, age_ms=HOUR_MS)
    report = await cleanup(bus, stale_after=600)
    assert {s.swarm: s.removed for s in report.swarms} == {"one": ["dead"], "two": ["dead"]}


async def test_two_cleanups_at_once_remove_each_coordinator_once(bus: Bus) -> None:
    for n in range(300):
        await _coordinator(bus, "race", f"dead{n}", beats=n % 2 == 0, age_ms=HOUR_MS)
    reports = []

    async def run() -> None:
        reports.append(await cleanup(bus, swarm="race", stale_after=600))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        tg.start_soon(run)
    removed = [c for r in reports for c in r.swarms[0].removed]
    assert sorted(removed) == sorted(f"dead{n}" for n in range(300))
    assert await bus.status("race") == []


def test_cli_cleanup_json_and_log_file(cli: Cli, bus_args: list[str], tmp_path: Path) -> None:
    log_file = tmp_path / "cleanup.log"
    got = cli.run("cleanup", "--swarm", "none-here", "--json", "--log-file", str(log_file),
                  *bus_args)
    assert got.returncode == 0, got.stderr
    report = one_json_object(got.stdout)
    assert report["removed_total"] == 0
    assert report["swarms"] == [{"swarm": "none-here", "removed": [], "groups_destroyed": 0,
                                 "retry_streams_removed": 0}]
    [line] = log_file.read_text().splitlines()
    assert json.loads(line)["removed_total"] == 0


async def test_a_coordinator_signaled_now_stays_whatever_its_index_says(bus: Bus) -> None:
    """The receipt leaves the coordinators index alone (one call less per receipt): a wait
    that began long ago keeps its old index score after a signal arrives now. Cleanup lists
    it as a candidate by that score and then re-checks the state's ``updated_ms``, which the
    receipt set, so the coordinator stays."""
    keys = bus.keys("idx")
    await bus.publish("idx", "ch", "now")
    delivery = await bus.wait_for("idx", "c", "ch", timeout=5)
    raw = bus._store.raw()
    now = await bus._store.time_ms()
    state = await bus._store.hgetall(keys.state("c"))
    assert state["state"] == "signaled"
    assert now - 5_000 < int(state["updated_ms"]) <= now
    await raw.zadd(keys.coordinators, {"c": now - HOUR_MS})  # as if it began waiting long ago
    report = await cleanup(bus, swarm="idx", stale_after=600)
    assert report.swarms[0].removed == []
    assert await raw.exists(keys.state("c")) == 1
    acked = (await bus._store.acks_snapshot(keys, delivery.signal.signal_id))[1]
    assert acked == {"c": delivery.ack_id}
    # The same coordinator, its state genuinely an hour old, goes.
    await raw.hset(keys.state("c"), mapping={"updated_ms": now - HOUR_MS})
    report = await cleanup(bus, swarm="idx", stale_after=600)
    assert report.swarms[0].removed == ["c"]
