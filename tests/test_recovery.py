"""The waiting side survives what production throws at it: outages, lost replies, poison."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

import streambus
from streambus import Delivery
from streambus.bus import Bus
from streambus.schema import Signal, encode
from tests.helpers import until_states
from tests.servers import ServerProcess

pytestmark = pytest.mark.anyio


@pytest.fixture
async def fault_bus(own_server: ServerProcess, namespace: str) -> AsyncIterator[Bus]:
    async with streambus.connect(own_server.url, namespace=namespace, block_ms=200) as bus:
        yield bus


async def _blocked_wait(bus: Bus, swarm: str, name: str, got: list[Delivery],
                        timeout: float = 20) -> None:
    got.append(await bus.wait_for(swarm, name, "ch", timeout=timeout))


async def test_waiter_survives_server_kill_and_restart(own_server: ServerProcess,
                                                        fault_bus: Bus) -> None:
    """Plan scenario 4 (restart): kill -9 Redis mid-wait, start it again, then signal."""
    got: list[Delivery] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_blocked_wait, fault_bus, "rk", "survivor", got)
        await until_states(fault_bus, "rk", {"survivor": "waiting"})
        own_server.kill()
        own_server.start()  # same port, same append-only file
        published = await fault_bus.publish("rk", "ch", "after restart")
    assert [d.signal.signal_id for d in got] == [published.signal_id]


async def test_waiter_survives_a_frozen_server(own_server: ServerProcess, fault_bus: Bus) -> None:
    """Plan scenario 4 (silence): SIGSTOP the server past the client's socket timeout."""
    got: list[Delivery] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_blocked_wait, fault_bus, "fz", "patient", got)
        await until_states(fault_bus, "fz", {"patient": "waiting"})
        own_server.freeze()
        await anyio.sleep(2.0)  # the outage itself: longer than the blocking socket timeout
        own_server.thaw()
        published = await fault_bus.publish("fz", "ch", "after thaw")
    assert [d.signal.signal_id for d in got] == [published.signal_id]


async def test_entry_delivered_but_never_acknowledged_is_delivered_again(bus: Bus) -> None:
    """A reply lost with its connection leaves the entry in the PEL; the next wait reads it."""
    keys = bus.keys("pel")
    published = await bus.publish("pel", "ch", "lost reply")
    await bus._store.ensure_group(keys.channel("ch"), "c")
    raw = bus._store.raw()
    await raw.xreadgroup("c", "c", {keys.channel("ch"): ">"}, count=1)  # delivered, never acked
    delivery = await bus.wait_for("pel", "c", "ch", timeout=5)
    assert delivery.signal.signal_id == published.signal_id
    assert await raw.xpending(keys.channel("ch"), "c") == {
        "pending": 0, "min": None, "max": None, "consumers": []}


async def test_poison_entries_are_dead_lettered_and_the_wait_goes_on(bus: Bus) -> None:
    keys = bus.keys("poison")
    raw = bus._store.raw()
    stream = keys.channel("ch")
    await raw.xadd(stream, {"e": b"{not json"})
    await raw.xadd(stream, {"other": b"field"})
    await raw.xadd(stream, {"e": encode(Signal(signal_id="wrong", swarm="x", channel="y"))[:-1]})
    published = await bus.publish("poison", "ch", "good")
    delivery = await bus.wait_for("poison", "c", "ch", timeout=5)
    assert delivery.signal.signal_id == published.signal_id
    dead = await bus._store.read_range(keys.dead_letters)
    assert len(dead) == 3
    reasons = [fields[b"reason"].decode() for _, fields in dead if fields]
    assert all(reasons), reasons
    assert dead[1][1] is not None
    assert dead[1][1][b"orig.other"] == b"field"
    assert (await bus._store.hgetall(keys.counters))["dead_letters"] == "3"
    pending = await raw.xpending(stream, "c")
    assert pending["pending"] == 0


async def test_entry_trimmed_while_pending_is_dead_lettered(bus: Bus) -> None:
    keys = bus.keys("nil")
    raw = bus._store.raw()
    stream = keys.channel("ch")
    doomed = await bus.publish("nil", "ch", "doomed")
    await bus._store.ensure_group(stream, "c")
    await raw.xreadgroup("c", "c", {stream: ">"}, count=1)
    await raw.xdel(stream, doomed.stream_id)  # as MAXLEN/MINID trimming would
    survivor = await bus.publish("nil", "ch", "survivor")
    delivery = await bus.wait_for("nil", "c", "ch", timeout=5)
    assert delivery.signal.signal_id == survivor.signal_id
    [(_, fields)] = await bus._store.read_range(keys.dead_letters)
    assert fields is not None
    assert b"no body" in fields[b"reason"]
    assert fields[b"source_id"].decode() == doomed.stream_id


async def test_group_lost_mid_wait_is_recreated(bus: Bus) -> None:
    """A restart without persistence (or a cleanup) drops the group under a blocked waiter."""
    got: list[Delivery] = []
    keys = bus.keys("nogroup")
    async with anyio.create_task_group() as tg:
        tg.start_soon(_blocked_wait, bus, "nogroup", "c", got)
        await until_states(bus, "nogroup", {"c": "waiting"})
        await bus._store.raw().xgroup_destroy(keys.channel("ch"), "c")
        published = await bus.publish("nogroup", "ch", "after loss")
    assert [d.signal.signal_id for d in got] == [published.signal_id]


async def test_many_waiters_in_one_process_share_one_blocking_connection(bus: Bus) -> None:
    names = [f"w{i}" for i in range(300)]
    got: list[Delivery] = []
    async with anyio.create_task_group() as tg:
        for name in names:
            tg.start_soon(_blocked_wait, bus, "many", name, got)
        await until_states(bus, "many", dict.fromkeys(names, "waiting"))
        clients_before = len(await bus._store.raw().client_list())
        published = await bus.publish("many", "ch", "all", await_acks=names, ack_timeout=10)
    assert len(published.acked_by) == len(names)
    assert {d.coordinator for d in got} == set(names)
    assert {d.signal.signal_id for d in got} == {published.signal_id}
    # 300 blocked waiters, yet only the pool (<= 32), one dispatcher and one ACK reader.
    assert clients_before <= 40


async def test_out_of_memory_is_a_clear_bus_unavailable_and_loses_nothing(
    own_server: ServerProcess, namespace: str
) -> None:
    """FMEA memory exhaustion: at maxmemory (noeviction) writes fail cleanly, nothing half-done."""
    async with streambus.connect(own_server.url, namespace=namespace,
                                 publish_retry_budget_s=0.3) as bus:
        accepted = await bus.publish("oom", "ch", "before the limit")
        raw = bus._store.raw()
        await raw.config_set("maxmemory-policy", "noeviction")
        await raw.config_set("maxmemory", 1)  # 1 byte: every write is refused
        with pytest.raises(streambus.BusUnavailable, match="out of memory"):
            await bus.publish("oom", "ch", "over the limit", signal_id="refused")
        await raw.config_set("maxmemory", 0)
        assert await raw.exists(bus.keys("oom").dedupe("refused")) == 0
        delivery = await bus.wait_for("oom", "c", "ch", timeout=5)
        assert delivery.signal.signal_id == accepted.signal_id
        retried = await bus.publish("oom", "ch", "over the limit", signal_id="refused")
        assert not retried.duplicate


async def test_waiting_again_for_a_received_iteration_returns_the_same_signal(bus: Bus) -> None:
    """A shell agent that crashed after receiving re-runs ``wait --iteration N``: same answer."""
    first = await bus.publish("idem", "ch", "one")
    second = await bus.publish("idem", "ch", "two")
    got = await bus.wait_for("idem", "c", "ch", timeout=5, iteration=1)
    again = await bus.wait_for("idem", "c", "ch", timeout=5, iteration=1)
    assert got.signal.signal_id == again.signal.signal_id == first.signal_id
    assert again.ack_id == got.ack_id
    assert again.stream_id == got.stream_id
    following = await bus.wait_for("idem", "c", "ch", timeout=5)
    assert following.signal.signal_id == second.signal_id
    assert following.iteration == 2


async def test_a_late_receipt_does_not_close_a_newer_wait(bus: Bus) -> None:
    """A receipt confirmed late (its first reply lost) acknowledges its signal but leaves the
    state of the coordinator's newer wait alone."""
    from streambus.dispatch import Waiter

    keys = bus.keys("late")
    published = await bus.publish("late", "ch", "old")
    old = await bus._store.begin_wait(keys, "c", "ch", 60_000, 1)
    stale = Waiter(keys, "c", "ch", keys.channel("ch"), old.iteration)
    signal = Signal(signal_id=published.signal_id, swarm="late", channel="ch")
    await bus._store.end_wait(keys, "c", "ch", 1, "cancelled", b'{"outcome":"cancelled"}')
    newer = await bus._store.begin_wait(keys, "c", "other", 60_000, 0)
    [ack_id] = await bus._store.receive_many([stale.receipt(signal, published.stream_id)])
    assert isinstance(ack_id, str)
    [row] = await bus.status("late")
    assert (row.state, row.iteration, row.channel) == ("waiting", newer.iteration,
                                                                 "other")
    assert await bus._store.ack_id(keys, published.signal_id, "c") == ack_id
