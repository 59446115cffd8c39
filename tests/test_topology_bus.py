"""The same bus on Redis Cluster (3 masters, 3 replicas) and Sentinel (a master, a replica,
3 sentinels), real processes on free ports: the core scenarios, then masters killed while
coordinators block.

One topology per binary and kind for the whole module (each takes ~2 s to come up); a test that
kills a master restarts it before it ends, so the next test finds the topology healthy.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread
import httpx
import pytest
from redis.crc import key_slot

import streambus
from streambus import Delivery, Liveness, PeerDead, RetryRequest, WaitTimeout
from streambus.bus import Bus
from streambus.keys import SwarmKeys
from streambus.signing import Keyring, SigningKey
from streambus.testing import LocalCluster, LocalSentinelSet, ServerProcess, server_binaries
from tests.clitools import Cli
from tests.dashboard_tools import running_dashboard
from tests.fakes import until

pytestmark = pytest.mark.anyio

KINDS = server_binaries()
FAST = Liveness(heartbeat_interval=0.1, dead_after=0.5)


@dataclass
class Topology:
    """A started cluster or Sentinel set, with the two faults the tests inject."""

    kind: str
    running: LocalCluster | LocalSentinelSet

    @property
    def url(self) -> str:
        return self.running.url

    def kill_master_of(self, key: str) -> ServerProcess:
        if isinstance(self.running, LocalCluster):
            return self.running.kill_master_of(key)
        return self.running.kill_master()

    def wait_failover(self, old: ServerProcess) -> ServerProcess:
        return self.running.wait_failover(old)

    def restart(self, node: ServerProcess) -> None:
        self.running.restart(node)


@pytest.fixture(scope="module",
                params=[(kind, binary) for kind in ("cluster", "sentinel") for binary in KINDS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def topology(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Topology]:
    kind, binary = request.param
    directory: Path = tmp_path_factory.mktemp(f"{kind}-{binary}")
    started = (LocalCluster(directory, KINDS[binary]) if kind == "cluster"
               else LocalSentinelSet(directory, KINDS[binary]))
    with started:
        yield Topology(kind, started)


@pytest.fixture
async def tbus(topology: Topology) -> AsyncIterator[Bus]:
    async with streambus.connect(topology.url, namespace=f"t{uuid.uuid4().hex[:10]}",
                                 block_ms=500) as bus:
        yield bus


async def test_a_signal_sent_before_the_wait_is_delivered(tbus: Bus) -> None:
    published = await tbus.publish("race", "done", {"n": 1})
    delivery = await tbus.wait_for("race", "c", "done", timeout=5)
    assert delivery.signal.signal_id == published.signal_id
    assert delivery.ack_id


async def test_fan_out_reaches_every_waiter_and_the_sender_sees_every_ack(tbus: Bus) -> None:
    got: dict[str, Delivery] = {}
    names = ["c1", "c2", "c3"]
    async with anyio.create_task_group() as tg:
        for name in names:
            async def wait(name: str = name) -> None:
                got[name] = await tbus.wait_for("fan", name, "go", timeout=10)
            tg.start_soon(wait)
        published = await tbus.publish("fan", "go", "x", await_acks=names, ack_timeout=10)
    assert published.acked_by == tuple(names)
    assert {d.signal.signal_id for d in got.values()} == {published.signal_id}


async def test_signed_signals_and_acks_verify_and_forgeries_are_dead_lettered(
        tbus: Bus, topology: Topology) -> None:
    """Issue 13 on every topology: a require-signed wait takes only the signed signal (the
    unsigned one is dead-lettered on the swarm's master), and the sender counts its signed ACK."""
    signing = Keyring((SigningKey("k1", b"topology-secret-0123"),))
    async with streambus.connect(topology.url, namespace=tbus.namespace, signing=signing,
                                 block_ms=500) as signer:
        await tbus.publish("signed", "go", "forged", signal_id="unsigned")
        async with anyio.create_task_group() as tg:
            got: list[Delivery] = []

            async def wait() -> None:
                got.append(await signer.wait_for("signed", "c", "go", timeout=10,
                                                  require_signed=True))
            tg.start_soon(wait)
            published = await signer.publish("signed", "go", "genuine", await_acks=["c"],
                                             ack_timeout=10, require_signed=True)
        assert published.acked_by == ("c",)
        assert got[0].signal.signal_id == published.signal_id
        assert (await signer.counters("signed"))["dead_letters"] == 1


async def test_a_wait_times_out_at_its_server_time_deadline(tbus: Bus) -> None:
    with pytest.raises(WaitTimeout) as caught:
        await tbus.wait_for("slow", "c", "never", timeout=0.3)
    [row] = await tbus.status("slow")
    assert row.state == "timed_out"
    assert caught.value.deadline_ms == row.deadline_ms


async def test_retry_requests_reach_a_blocked_coordinator(tbus: Bus) -> None:
    handled: list[RetryRequest] = []
    async with anyio.create_task_group() as tg:
        async def blocked() -> None:
            await tbus.wait_for("rr", "c", "done", timeout=10, on_retry=handled.append)
        tg.start_soon(blocked)
        await tbus.request_retry("rr", "c", reason="tests fail")
        await until(lambda: bool(handled))
        await tbus.publish("rr", "done", None)
    assert [r.reason for r in handled] == ["tests fail"]


async def test_a_dead_peer_ends_the_wait(tbus: Bus) -> None:
    peer = tbus.coordinator("dp", "peer", liveness=FAST)
    async with peer.heartbeating():
        await anyio.sleep(0.2)  # the peer beats a few times, then its process "dies"
    waiter = tbus.coordinator("dp", "waiter", liveness=FAST)
    with pytest.raises(PeerDead):
        await waiter.wait_for("done", timeout=10, watch=["peer"])


async def test_every_swarm_is_listed_from_every_master(tbus: Bus, topology: Topology) -> None:
    swarms = [f"s{n}" for n in range(24)]
    for swarm in swarms:
        await tbus.publish(swarm, "ch", swarm)
    summaries = await tbus.swarms()
    assert [s.swarm for s in summaries] == sorted(swarms)
    if isinstance(topology.running, LocalCluster):
        owners = {topology.running.master_of(SwarmKeys.for_swarm(tbus.namespace, s).prefix).port
                  for s in swarms}
        assert len(owners) == 3  # swarms spread over the three masters


async def test_coordinators_blocked_on_a_killed_master_get_the_next_signal(
    tbus: Bus, topology: Topology
) -> None:
    keys = tbus.keys("failover")
    got: dict[str, Delivery] = {}
    names = ["c1", "c2"]
    async with anyio.create_task_group() as tg:
        for name in names:
            async def wait(name: str = name) -> None:
                got[name] = await tbus.wait_for("failover", name, "next", timeout=60)
            tg.start_soon(wait)
        await _until_blocking(tbus, "failover", names)
        old = await anyio.to_thread.run_sync(topology.kill_master_of, keys.prefix)
        try:
            await anyio.to_thread.run_sync(topology.wait_failover, old)
            published = await tbus.publish("failover", "next", "after the failover")
        finally:
            await anyio.to_thread.run_sync(topology.restart, old)
    assert {d.signal.signal_id for d in got.values()} == {published.signal_id}


async def test_a_replicated_signal_survives_the_death_of_its_master(
    tbus: Bus, topology: Topology
) -> None:
    keys = tbus.keys("durable")
    published = await tbus.publish("durable", "ch", "kept", durability="replicated")
    old = await anyio.to_thread.run_sync(topology.kill_master_of, keys.prefix)
    try:
        await anyio.to_thread.run_sync(topology.wait_failover, old)
        delivery = await tbus.wait_for("durable", "late", "ch", timeout=20)
    finally:
        await anyio.to_thread.run_sync(topology.restart, old)
    assert delivery.signal.signal_id == published.signal_id


async def test_a_failing_master_does_not_disturb_waiters_on_the_others(
    tbus: Bus, topology: Topology
) -> None:
    if not isinstance(topology.running, LocalCluster):
        pytest.skip("one master in a Sentinel set: nothing else to disturb")
    cluster = topology.running
    doomed, healthy = _swarms_on_two_masters(tbus, cluster)
    async with anyio.create_task_group() as tg:
        got: list[Delivery] = []

        async def wait() -> None:
            got.append(await tbus.wait_for(healthy, "c", "ch", timeout=30))

        async def doomed_wait() -> None:
            await tbus.wait_for(doomed, "c", "ch", timeout=30)

        tg.start_soon(wait)
        tg.start_soon(doomed_wait)
        await _until_blocking(tbus, healthy, ["c"])
        await _until_blocking(tbus, doomed, ["c"])
        old = await anyio.to_thread.run_sync(
            cluster.kill_master_of, tbus.keys(doomed).prefix)
        try:
            # While the other master is dead and not yet replaced, the healthy swarm works.
            with anyio.fail_after(5):
                published = await tbus.publish(healthy, "ch", "unaffected")
                await until(lambda: bool(got))
            await anyio.to_thread.run_sync(cluster.wait_failover, old)
            await tbus.publish(doomed, "ch", "after")
        finally:
            await anyio.to_thread.run_sync(cluster.restart, old)
    assert got[0].signal.signal_id == published.signal_id


def test_the_cli_works_on_the_topology(cli: Cli, topology: Topology) -> None:
    common = ["--redis-url", topology.url, "--namespace", f"t{uuid.uuid4().hex[:10]}"]
    sent = cli.run("signal", "epic", "done", "--payload", '{"ok": true}', *common)
    assert sent.returncode == 0, sent.stderr
    waited = cli.run("wait", "epic", "c", "done", "--timeout", "5s", *common)
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout)["payload"] == {"ok": True}
    listed = cli.run("status", "--json", *common)
    assert listed.returncode == 0, listed.stderr
    [summary] = json.loads(listed.stdout)["swarms"]
    assert (summary["swarm"], summary["signaled"]) == ("epic", 1)
    cleaned = cli.run("cleanup", "--json", "--stale-after", "0s", *common)
    assert cleaned.returncode == 0, cleaned.stderr
    assert json.loads(cleaned.stdout)["removed_total"] == 1


async def _until_blocking(bus: Bus, swarm: str, names: list[str]) -> None:
    with anyio.fail_after(10):
        while True:
            rows = {r.coordinator: r.state for r in await bus.status(swarm)}
            if all(rows.get(n) == "waiting" for n in names):
                dispatcher = bus._runtime.dispatchers.get(swarm)
                if dispatcher is not None and dispatcher.quiescent:
                    return
            await anyio.sleep(0.01)


def _swarms_on_two_masters(bus: Bus, cluster: LocalCluster) -> tuple[str, str]:
    by_master: dict[int, str] = {}
    for n in range(100):
        swarm = f"x{n}"
        by_master.setdefault(cluster.master_of(bus.keys(swarm).prefix).port, swarm)
        if len(by_master) == 2:
            break
    first, second = by_master.values()
    assert key_slot(bus.keys(first).prefix.encode()) != key_slot(bus.keys(second).prefix.encode())
    return first, second


def test_the_cfn_demo_runs_on_the_topology(cli: Cli, topology: Topology) -> None:
    """The CFN Loop end to end (its own Lua script, run through ``bus.run_script`` on the
    master of the swarm's slot), then listed by ``status`` from every master."""
    common = ["--redis-url", topology.url, "--namespace", f"t{uuid.uuid4().hex[:10]}"]
    demo = cli.run("demo", "--pace", "0", "--seed", "5", "--json", *common)
    assert demo.returncode == 0, demo.stderr
    summary = json.loads(demo.stdout.strip().splitlines()[-1])
    assert summary["phases"]
    assert all(p["state"] for p in summary["phases"])
    listed = cli.run("status", "--json", *common)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["swarms"], "the demo's swarm is listed"


async def test_the_dashboard_lists_the_swarms_of_every_master(tbus: Bus) -> None:
    swarms = {f"d{n}" for n in range(6)}  # on a cluster, spread over its masters
    for swarm in swarms:
        await tbus.publish(swarm, "done", sender="v")
    async with running_dashboard(tbus) as (url, _), httpx.AsyncClient(base_url=url) as client:
        listed = await client.get("/api/swarms")
        assert listed.status_code == 200
        assert swarms <= {s["swarm"] for s in listed.json()["swarms"]}
        page = await client.get("/swarms/d0")
        assert page.status_code == 200
