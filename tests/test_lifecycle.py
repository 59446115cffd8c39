"""Resources have one owner each: dispatchers retire when idle, closing is safe twice, and a
long-running process that visited many swarms keeps a bounded number of connections."""

from __future__ import annotations

import pytest

import streambus
from streambus.bus import Bus
from tests.fakes import until

pytestmark = pytest.mark.anyio


async def _connections(bus: Bus) -> int:
    return len(await bus._store.raw().client_list())


async def test_a_thousand_swarms_visited_in_turn_leave_a_bounded_number_of_connections(
    redis_url: str, namespace: str
) -> None:
    async with streambus.connect(redis_url, namespace=namespace,
                                 dispatcher_idle_s=0.05) as bus:
        dispatchers = bus._runtime.dispatchers
        before = await _connections(bus)
        most = 0
        for n in range(1000):
            swarm = f"sw{n}"
            await bus.publish(swarm, "ch", n)
            delivery = await bus.wait_for(swarm, "c", "ch", timeout=5)
            assert delivery.signal.payload == n
            most = max(most, len(dispatchers))
        await until(lambda: len(dispatchers) == 0)
        assert dispatchers.retired == 1000
        assert most < 1000  # retired along the way, not only at the end
        # The pool's connections (at most 32) and no blocking reader per swarm visited.
        assert await _connections(bus) - before <= 32


async def test_a_leased_dispatcher_is_never_retired(bus: Bus) -> None:
    dispatchers = bus._runtime.dispatchers
    dispatchers.idle_s = 0.0
    keys = bus.keys("leased")
    async with dispatchers.lease(keys) as first:
        assert await dispatchers.retire_idle() == 0
        assert dispatchers.get("leased") is first
    assert await dispatchers.retire_idle() == 1
    assert dispatchers.get("leased") is None
    async with dispatchers.lease(keys) as second:  # a wait arriving later gets a new one
        assert second is not first
        assert dispatchers.get("leased") is second


async def test_closing_twice_is_safe(redis_url: str, namespace: str) -> None:
    async with streambus.connect(redis_url, namespace=namespace) as bus:
        await bus.publish("twice", "ch", 1)
        await bus.wait_for("twice", "c", "ch", timeout=5)
        await bus.aclose()
        await bus.aclose()
        await bus._store.aclose()
    await bus.aclose()
