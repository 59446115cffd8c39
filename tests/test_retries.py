"""Retry requests handled while blocked, backpressure, stranded entries, publish durability."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

import streambus
from streambus import Backpressure, DurabilityNotReached, RetryRequest
from streambus.bus import Bus, Delivery
from streambus.retries import RetryConsumer
from tests.helpers import until_states
from tests.servers import ServerProcess

pytestmark = pytest.mark.anyio


async def _backlog(bus: Bus, swarm: str, coordinator: str) -> int:
    counts = await bus._store.hgetall(bus.keys(swarm).retry_backlog)
    return int(counts.get(coordinator, 0))


async def test_blocked_coordinator_processes_retry_requests_without_leaving_its_wait(
    bus: Bus,
) -> None:
    handled: list[RetryRequest] = []
    got: list[Delivery] = []

    async def on_retry(request: RetryRequest) -> None:
        handled.append(request)

    async with anyio.create_task_group() as tg:
        async def wait() -> None:
            got.append(await bus.wait_for("rr", "impl", "loop2-done", timeout=20,
                                          on_retry=on_retry))

        tg.start_soon(wait)
        await until_states(bus, "rr", {"impl": "waiting"})
        for i in range(50):
            await bus.request_retry("rr", "impl", reason=f"fix {i}", blockers=[f"b{i}"],
                                    requested_by="validator-1", request_id=f"req-{i}")
        with anyio.fail_after(10):
            while True:
                if await _backlog(bus, "rr", "impl") == 0:
                    break
                await anyio.sleep(0.02)
        states = {r.coordinator: r.state for r in await bus.status("rr")}
        published = await bus.publish("rr", "loop2-done", "consensus reached")
    assert states["impl"] == "waiting"  # still blocked while it handled all 50
    assert [r.reason for r in handled] == [f"fix {i}" for i in range(50)]
    assert handled[7].blockers == ["b7"]
    assert [d.signal.signal_id for d in got] == [published.signal_id]


async def test_duplicate_retry_request_is_appended_once(bus: Bus) -> None:
    first = await bus.request_retry("dupr", "c", reason="x", request_id="same")
    again = await bus.request_retry("dupr", "c", reason="x", request_id="same")
    assert again.duplicate
    assert again.stream_id == first.stream_id
    assert await _backlog(bus, "dupr", "c") == 1


async def test_backlog_limit_raises_backpressure_and_drops_nothing(bus: Bus) -> None:
    for i in range(5):
        await bus.request_retry("bp", "slow", reason=str(i), backlog_limit=5)
    with pytest.raises(Backpressure) as caught:
        await bus.request_retry("bp", "slow", reason="one too many", backlog_limit=5)
    assert caught.value.backlog == 5
    entries = await bus._store.read_range(bus.keys("bp").retries("slow"))
    assert len(entries) == 5  # the refused request was not appended


async def test_backpressure_with_wait_succeeds_once_the_backlog_drains(bus: Bus) -> None:
    for i in range(3):
        await bus.request_retry("bpw", "c", reason=str(i), backlog_limit=3)
    handled: list[str] = []
    consumer = RetryConsumer(bus._store, bus.keys("bpw"), "c",
                             lambda request: handled.append(request.reason))
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        sent = await bus.request_retry("bpw", "c", reason="late", backlog_limit=3, wait=5)
        with anyio.fail_after(5):
            while True:
                if "late" in handled:
                    break
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    assert not sent.duplicate
    assert handled == ["0", "1", "2", "late"]


async def test_stranded_requests_of_a_dead_consumer_are_claimed_by_its_replacement(
    bus: Bus,
) -> None:
    keys = bus.keys("strand")
    for i in range(3):
        await bus.request_retry("strand", "c", reason=str(i))
    stream = keys.retries("c")
    await bus._store.ensure_group(stream, "c")
    raw = bus._store.raw()
    await raw.xreadgroup("c", "c.dead-instance", {stream: ">"}, count=10)  # then it died
    handled: list[str] = []
    replacement = RetryConsumer(bus._store, keys, "c",
                                lambda request: handled.append(request.reason), claim_idle=0)
    async with anyio.create_task_group() as tg:
        await tg.start(replacement.run)
        with anyio.fail_after(5):
            while True:
                if len(handled) == 3:
                    break
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    assert handled == ["0", "1", "2"]
    assert await _backlog(bus, "strand", "c") == 0
    assert (await raw.xpending(stream, "c"))["pending"] == 0


async def test_failing_handler_is_retried_then_dead_lettered(bus: Bus) -> None:
    await bus.request_retry("fail", "c", reason="cursed")
    await bus.request_retry("fail", "c", reason="fine")
    seen: list[str] = []

    def handler(request: RetryRequest) -> None:
        seen.append(request.reason)
        if request.reason == "cursed":
            raise RuntimeError("handler bug")

    consumer = RetryConsumer(bus._store, bus.keys("fail"), "c", handler, max_attempts=3)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        with anyio.fail_after(10):
            while True:
                if await _backlog(bus, "fail", "c") == 0:
                    break
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    assert seen.count("cursed") == 3
    assert seen.count("fine") == 1
    [(_, fields)] = await bus._store.read_range(bus.keys("fail").dead_letters)
    assert fields is not None
    assert b"handler failed 3 times" in fields[b"reason"]


@pytest.fixture
async def aof_bus(own_server: ServerProcess, namespace: str) -> AsyncIterator[Bus]:
    async with streambus.connect(own_server.url, namespace=namespace) as bus:
        yield bus


async def test_fsync_durability_is_confirmed_with_aof(aof_bus: Bus) -> None:
    published = await aof_bus.publish("dur", "ch", "on disk", durability="fsync")
    assert not published.duplicate


async def test_replicated_durability_without_replicas_says_so(aof_bus: Bus) -> None:
    with pytest.raises(DurabilityNotReached, match="appended"):
        await aof_bus.publish("dur", "ch", "no replica", durability="replicated",
                              signal_id="rep-1")
    # The signal was appended; publishing again with its id is safe and reports a duplicate.
    again = await aof_bus.publish("dur", "ch", "no replica", signal_id="rep-1")
    assert again.duplicate
