"""Publishing, waiting and ACKs against real servers: the plan's scenarios 1, 2 and 5."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
import pytest

from streambus import AckTimeout, Delivery, InvalidId, PayloadTooLarge, WaitTimeout
from streambus.bus import Bus
from streambus.schema import BlockingEnded, SignalReceived, decode_fields
from tests.helpers import until_states

pytestmark = pytest.mark.anyio


async def test_scenario_1_two_waiters_both_receive_one_signal(bus: Bus) -> None:
    """A and B block, C signals, both return with the same signal and C sees both ACKs."""
    results: dict[str, Delivery] = {}

    async def wait(name: str) -> None:
        results[name] = await bus.wait_for("s1", name, "loop2-done", timeout=10)

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait, "coord-a")
        tg.start_soon(wait, "coord-b")
        await until_states(bus, "s1", {"coord-a": "waiting", "coord-b": "waiting"})
        published = await bus.publish("s1", "loop2-done", {"ok": True}, sender="coord-c",
                                      await_acks=["coord-a", "coord-b"], ack_timeout=10)
    assert published.acked_by == ("coord-a", "coord-b")
    assert not published.duplicate
    for name in ("coord-a", "coord-b"):
        assert results[name].signal.signal_id == published.signal_id
        assert results[name].signal.payload == {"ok": True}
        assert results[name].signal.sender == "coord-c"
        assert results[name].stream_id == published.stream_id
    states = {row.coordinator: row.state for row in await bus.status("s1")}
    assert states == {"coord-a": "signaled", "coord-b": "signaled"}


async def test_scenario_5_signal_sent_before_the_waiter_started_is_delivered(bus: Bus) -> None:
    published = await bus.publish("s5", "done", "early")
    with anyio.fail_after(5):
        delivery = await bus.wait_for("s5", "late-coordinator", "done", timeout=30)
    assert delivery.signal.signal_id == published.signal_id
    assert delivery.signal.payload == "early"


async def test_each_wait_gets_the_next_signal_once(bus: Bus) -> None:
    first = await bus.publish("seq", "ch", 1)
    second = await bus.publish("seq", "ch", 2)
    got = [await bus.wait_for("seq", "c", "ch", timeout=5) for _ in range(2)]
    assert [d.signal.signal_id for d in got] == [first.signal_id, second.signal_id]
    assert [d.iteration for d in got] == [1, 2]
    with pytest.raises(WaitTimeout):
        await bus.wait_for("seq", "c", "ch", timeout=0.2)


async def test_duplicate_signal_id_is_reported_and_delivered_once(bus: Bus) -> None:
    first = await bus.publish("dup", "ch", "x", signal_id="sig-1")
    again = await bus.publish("dup", "ch", "y", signal_id="sig-1")
    assert again.duplicate
    assert not first.duplicate
    assert again.stream_id == first.stream_id
    delivery = await bus.wait_for("dup", "c", "ch", timeout=5)
    assert delivery.signal.payload == "x"
    with pytest.raises(WaitTimeout):
        await bus.wait_for("dup", "c", "ch", timeout=0.2)


async def test_ack_timeout_names_who_did_and_did_not_acknowledge(bus: Bus) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: bus.wait_for("acks", "present", "ch", timeout=10))
        await until_states(bus, "acks", {"present": "waiting"})
        with pytest.raises(AckTimeout) as caught:
            await bus.publish("acks", "ch", await_acks=["present", "absent"], ack_timeout=0.5)
    assert caught.value.acked_by == ("present",)
    assert caught.value.missing == ("absent",)
    assert isinstance(caught.value, TimeoutError)


async def test_scenario_2_timeout_fires_on_time_and_leaves_nothing_pending(bus: Bus) -> None:
    started = anyio.current_time()
    with pytest.raises(WaitTimeout) as caught:
        await bus.wait_for("s2", "lonely", "never", timeout=0.3)
    elapsed = anyio.current_time() - started
    assert 0.3 <= elapsed < 2.0
    [row] = await bus.status("s2")
    assert row.state == "timed_out"
    assert row.outcome == "timeout"
    assert caught.value.deadline_ms == row.deadline_ms
    assert row.deadline_ms - row.started_ms == 300


async def test_restarted_waiter_keeps_its_deadline_and_gets_the_signal(bus: Bus) -> None:
    """A coordinator cancelled mid-wait (as a crash would) waits again: same deadline."""
    with anyio.move_on_after(0.2):
        await bus.wait_for("rs", "phoenix", "ch", timeout=60)
    [before] = await bus.status("rs")
    # Cancellation is recorded; a process killed outright would leave the state 'waiting'.
    assert before.state == "cancelled"
    await bus._store.begin_wait(bus.keys("rs"), "phoenix", "ch", 60_000, 0)  # as if crashed
    [crashed] = await bus.status("rs")
    published = await bus.publish("rs", "ch", "while down")
    async with anyio.create_task_group() as tg:
        got: list[Delivery] = []

        async def rewait() -> None:
            got.append(await bus.wait_for("rs", "phoenix", "ch", timeout=1))

        tg.start_soon(rewait)
    assert got[0].signal.signal_id == published.signal_id
    assert got[0].iteration == crashed.iteration
    [after] = await bus.status("rs")
    assert after.deadline_ms == crashed.deadline_ms
    assert after.state == "signaled"


async def test_lifecycle_events_record_the_wait(bus: Bus) -> None:
    await bus.publish("life", "ch", None, signal_id="s-1")
    await bus.wait_for("life", "c", "ch", timeout=5)
    events = [decode_fields(f) for _, f in await bus._store.read_range(bus.keys("life").events)]
    kinds = [type(e).__name__ for e in events]
    # One event ends a signaled wait: the receipt (once a SignalReceived of its own) is
    # derived from it.
    assert kinds == ["BlockingStarted", "BlockingEnded"]
    ended = events[1]
    assert isinstance(ended, BlockingEnded)
    assert ended.outcome == "signaled"
    received = ended.received()
    assert isinstance(received, SignalReceived)
    assert received.signal_id == "s-1"
    [(entry_id, _)] = await bus._store.read_range(bus.keys("life").channel("ch"))
    assert received.stream_id == entry_id


@pytest.mark.parametrize("bad", ["", "has space", "{tag}", "a*", "x" * 65, "-lead", "a:b"])
async def test_invalid_ids_are_rejected_before_anything_is_written(bus: Bus, bad: str) -> None:
    with pytest.raises(InvalidId):
        await bus.publish(bad, "ch")
    with pytest.raises(InvalidId):
        await bus.publish("swarm", bad)
    with pytest.raises(InvalidId):
        await bus.wait_for("swarm", bad, "ch", timeout=1)
    assert await bus.status("swarm") == []
    assert await bus._store.read_range(bus.keys("swarm").channel("ch")) == []


async def test_oversized_and_unserialisable_payloads_are_rejected(bus: Bus) -> None:
    with pytest.raises(PayloadTooLarge):
        await bus.publish("big", "ch", "x" * (2 * 1024 * 1024))
    with pytest.raises(ValueError, match="JSON"):
        await bus.publish("big", "ch", object())
    assert await bus._store.read_range(bus.keys("big").channel("ch")) == []


async def test_every_record_of_a_wait_expires_or_is_trimmed(bus: Bus) -> None:
    """FMEA orphaned blocking state: nothing a coordinator leaves behind lives forever."""
    published = await bus.publish("ttl", "ch", "x", signal_id="s-ttl")
    await bus.wait_for("ttl", "c", "ch", timeout=5)
    keys = bus.keys("ttl")
    raw = bus._store.raw()
    day = 24 * 3600
    for key in (keys.dedupe("s-ttl"), keys.acked("s-ttl")):
        assert 0 < await raw.ttl(key) <= day, key
    # The state: a day after the wait's deadline (5 s), set when the wait began.
    assert day < await raw.ttl(keys.state("c")) <= day + 5
    # Streams are trimmed instead: channels by age on publish, event streams by length.
    assert published.stream_id


async def test_a_received_wait_keeps_its_state_a_day_past_its_deadline(bus: Bus) -> None:
    """The receipt sets no expiry of its own (one command less per waiter): the one begin_wait
    set outlasts the deadline by the state ttl, so a wait signaled late in a long timeout
    still leaves its state for a day."""
    await bus.publish("long", "ch", "x")
    await bus.wait_for("long", "c", "ch", timeout=7 * 24 * 3600)
    state = bus.keys("long").state("c")
    assert await bus._store.raw().hget(state, "state") == b"signaled"
    assert 8 * 24 * 3600 - 60 < await bus._store.raw().ttl(state) <= 8 * 24 * 3600


async def test_a_wait_cancelled_before_it_blocks_is_recorded_cancelled(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled after begin_wait ran but before the wait blocked (here: while it gets its
    dispatcher), the wait must not stay 'waiting' on the bus until its deadline."""
    dispatchers = bus._runtime.dispatchers
    real = dispatchers.lease
    with anyio.CancelScope() as scope:

        @contextlib.asynccontextmanager
        async def cancelled_meanwhile(keys: object) -> AsyncIterator[object]:
            scope.cancel()
            await anyio.lowlevel.checkpoint()  # the cancellation lands here
            async with real(keys) as dispatcher:  # type: ignore[arg-type]
                yield dispatcher

        monkeypatch.setattr(dispatchers, "lease", cancelled_meanwhile)
        await bus.wait_for("early", "c", "ch", timeout=60)
    [row] = await bus.status("early")
    assert row.state == "cancelled"


async def test_ack_wait_counts_each_coordinator_once_as_acks_arrive(bus: Bus) -> None:
    published = await bus.publish("acks2", "ch", "x")
    async with anyio.create_task_group() as tg:
        for name in ("a", "b", "c"):
            tg.start_soon(lambda name=name: bus.wait_for("acks2", name, "ch", timeout=10))
        acked = await bus.wait_for_acks("acks2", published.signal_id, ["a", "b", "a", "c"],
                                        timeout=10)
    assert acked == ("a", "b", "c")
