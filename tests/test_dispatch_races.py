"""Races a real server cannot time, played by the scripted fake of the dispatcher's store
(``tests/fakes.py``): each fault fires at exactly the step it names, every run.

What each asserts is the first promise: the waiter gets the signal that was there for it, once,
and nothing is skipped.
"""

from __future__ import annotations

import anyio
import pytest

from streambus.dispatch import Dispatcher
from streambus.keys import SwarmKeys
from streambus.schema import Signal
from streambus.waiter import Outcome, Received, Waiter, WaiterState
from tests.fakes import FakeStore, until

pytestmark = pytest.mark.anyio

KEYS = SwarmKeys.for_swarm("ns", "sw")


def signal(n: int, channel: str = "ch") -> Signal:
    return Signal(signal_id=f"s{n}", swarm="sw", channel=channel, payload=n)


async def waiter_for(store: FakeStore, coordinator: str, channel: str = "ch") -> Waiter:
    stream = KEYS.channel(channel)
    await store.ensure_group(stream, coordinator)  # begin_wait's job on a real server
    return Waiter(KEYS, coordinator, channel, stream, iteration=1)


async def settled(dispatcher: Dispatcher, waiter: Waiter, within: float = 5.0) -> Outcome:
    with anyio.fail_after(within):
        await waiter.settled.wait()
    return await dispatcher.finish(waiter, cancelled=False)


async def test_a_lost_receipt_reply_is_confirmed_not_skipped() -> None:
    """The receive script ran (the entry is acknowledged) but its reply was lost. A fresh
    read would find the *next* signal and skip this one: the waiter must confirm the receipt
    it sent instead, and get the first signal with the ACK that was recorded."""
    store = FakeStore()
    store.server.lose_next_receipt_reply = True
    dispatcher = Dispatcher(store, KEYS, block_ms=5000)
    waiter = await waiter_for(store, "c")
    first = store.server.publish(waiter.stream, signal(1))
    async with anyio.create_task_group() as tg:
        await tg.start(dispatcher.run)
        dispatcher.add(waiter)
        store.server.publish(waiter.stream, signal(2))  # waiting behind it
        outcome = await settled(dispatcher, waiter)
        tg.cancel_scope.cancel()
    assert isinstance(outcome, Received)
    assert (outcome.signal.signal_id, outcome.stream_id) == ("s1", first)
    assert outcome.ack_id == store.server.acks[(first, "c")]
    assert store.server.calls["receive_many"] == 2  # sent once more, to learn the outcome
    assert ("2-0", "c") not in store.server.acks  # the next signal was not taken


async def test_nogroup_mid_batch_recreates_the_group_and_delivers() -> None:
    """Two waiters read in one batch; one's group vanished (a restart without AOF, or a
    cleanup) between its wait starting and the read. It is created again at the start of the
    stream, and that waiter gets the same signal as the other."""
    store = FakeStore()
    dispatcher = Dispatcher(store, KEYS, block_ms=5000)
    one, two = await waiter_for(store, "c1"), await waiter_for(store, "c2")
    store.server.drop_group = "c2"
    entry = store.server.publish(one.stream, signal(1))
    async with anyio.create_task_group() as tg:
        await tg.start(dispatcher.run)
        dispatcher.add(one)
        dispatcher.add(two)
        outcomes = [await settled(dispatcher, one), await settled(dispatcher, two)]
        tg.cancel_scope.cancel()
    for outcome in outcomes:
        assert isinstance(outcome, Received)
        assert (outcome.signal.signal_id, outcome.stream_id) == ("s1", entry)
    assert store.server.calls["ensure_group"] == 3  # two by begin_wait, one recreated


async def test_bus_vanishing_between_probe_and_read_loses_no_signal() -> None:
    """The probe's reply came, then the connection died before the group reads ran; a signal
    is published while the bus is down. When it returns the waiter reads its PEL first, then
    the stream, and gets that signal."""
    store = FakeStore()
    store.server.vanish_after_probe = True
    dispatcher = Dispatcher(store, KEYS, block_ms=5000)
    waiter = await waiter_for(store, "c")
    async with anyio.create_task_group() as tg:
        await tg.start(dispatcher.run)
        dispatcher.add(waiter)
        await until(lambda: store.server.down)
        entry = store.server.publish(waiter.stream, signal(7))
        store.server.down = False  # the server is back
        outcome = await settled(dispatcher, waiter)
        tg.cancel_scope.cancel()
    assert isinstance(outcome, Received)
    assert (outcome.signal.signal_id, outcome.stream_id) == ("s7", entry)


async def test_an_unblock_racing_the_read_is_retried_until_it_lands() -> None:
    """A second waiter arrives while the dispatcher's read is on its way to the server:
    CLIENT UNBLOCK finds nothing blocked yet (it answers 0) three times. The dispatcher tries
    again until it lands, so the newcomer is served now, not after the 30 s BLOCK."""
    store = FakeStore()
    dispatcher = Dispatcher(store, KEYS, block_ms=30_000)
    first, second = await waiter_for(store, "c1", "a"), await waiter_for(store, "c2", "b")
    async with anyio.create_task_group() as tg:
        await tg.start(dispatcher.run)
        dispatcher.add(first)
        await until(lambda: dispatcher.quiescent)  # blocked in the first waiter's read
        store.server.slow_to_block = 3
        dispatcher.add(second)
        entry = store.server.publish(second.stream, signal(2, "b"))
        outcome = await settled(dispatcher, second, within=2.0)
        assert first.state is WaiterState.QUEUED  # still served, untouched
        tg.cancel_scope.cancel()
    assert isinstance(outcome, Received)
    assert outcome.stream_id == entry
    assert store.server.calls["unblock"] >= 4


async def test_a_withdrawal_at_the_deadline_with_a_lost_receipt_confirms_it() -> None:
    """The deadline passes while a receipt's reply is lost and the bus is down: the outcome is
    an error that says the receipt could not be confirmed, never a silent timeout."""
    store = FakeStore()
    store.server.lose_next_receipt_reply = True
    store.server.down_with_lost_reply = True
    dispatcher = Dispatcher(store, KEYS, block_ms=5000)
    waiter = await waiter_for(store, "c")
    store.server.publish(waiter.stream, signal(1))
    async with anyio.create_task_group() as tg:
        await tg.start(dispatcher.run)
        dispatcher.add(waiter)
        await until(lambda: waiter.unconfirmed is not None
                    and waiter.state is not WaiterState.DELIVERING)
        outcome = await dispatcher.finish(waiter, cancelled=False)
        tg.cancel_scope.cancel()
    assert isinstance(outcome, ConnectionError)
    assert "could not be confirmed" in str(outcome)
