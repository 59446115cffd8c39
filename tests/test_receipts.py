"""The receive script with receipts grouped by entry: what a fan-out shares is written once, and
every receipt is still recorded once, whatever the grouping, repeats or retries."""

from __future__ import annotations

import pytest

from streambus import Bus
from streambus.keys import ACKED_EXPIRY_MARK
from streambus.schema import Ack, BlockingEnded, BlockingStarted, decode_fields
from streambus.store import GroupRead, Receipt

pytestmark = pytest.mark.anyio


async def test_grouped_receipts_are_recorded_once_each_and_idempotently(bus: Bus) -> None:
    store, keys = bus._store, bus.keys("grouped")
    waits = {("a", "x"): 0, ("b", "x"): 0, ("c", "y"): 0}
    for coordinator, channel in waits:
        start = await store.begin_wait(keys, coordinator, channel, 60_000, 0)
        waits[(coordinator, channel)] = start.iteration
    x = await bus.publish("grouped", "x", "to a and b", signal_id="sx")
    y = await bus.publish("grouped", "y", "to c", signal_id="sy")
    _, reads = await store.read_groups([GroupRead(keys.channel(ch), c, True) for c, ch in waits])
    # Each pending read found nothing pending and read the new entry in the same step; a and b
    # got the same entry, its body sent once and shared.
    assert [r[0][0] for r in reads if isinstance(r, list)] == [x.stream_id, x.stream_id,
                                                              y.stream_id]
    receipts = [Receipt(keys=keys, coordinator=c, channel=ch,
                        stream_id=x.stream_id if ch == "x" else y.stream_id,
                        signal_id="sx" if ch == "x" else "sy", iteration=i, started_ms=1)
                for (c, ch), i in waits.items()]
    # Interleaved channels and a receipt given twice in one call.
    first = await store.receive_many([receipts[0], receipts[2], receipts[1], receipts[0]])
    again = await store.receive_many(receipts)
    assert first[0] == first[3]
    assert again == [first[0], first[2], first[1]]
    acks = [decode_fields(f) for _, f in await store.read_range(keys.acks)]
    assert sorted((a.coordinator, a.signal_id) for a in acks if isinstance(a, Ack)) == [
        ("a", "sx"), ("b", "sx"), ("c", "sy")]
    events = [decode_fields(f) for _, f in await store.read_range(keys.events)]
    ends = [e for e in events if not isinstance(e, BlockingStarted)]
    assert all(isinstance(e, BlockingEnded) and e.outcome == "signaled" for e in ends)
    assert sorted((e.coordinator, e.stream_id) for e in ends
                  if isinstance(e, BlockingEnded)) == [
        ("a", x.stream_id), ("b", x.stream_id), ("c", y.stream_id)]
    assert await store.hgetall(keys.acked("sx")) == {"a": first[0], "b": first[2],
                                                     ACKED_EXPIRY_MARK: "1"}
    # The sender's view of who acknowledged names coordinators only.
    assert (await store.acks_snapshot(keys, "sx"))[1] == {"a": first[0], "b": first[2]}
    for coordinator, _ in waits:
        assert (await store.hgetall(keys.state(coordinator)))["state"] == "signaled"


async def test_the_acked_hash_gets_its_expiry_once_and_from_any_first_writer(bus: Bus) -> None:
    """The first receipt of a signal gives its acked hash the dedupe ttl and marks it; later
    receipts (other processes) find the mark and leave the expiry alone. A hash an older
    writer left without the mark gets its expiry from the next receipt all the same."""
    store, keys = bus._store, bus.keys("marks")
    raw = store.raw()
    day = 24 * 3600
    for coordinator in ("a", "b", "c"):
        await store.begin_wait(keys, coordinator, "x", 60_000, 0)
    x = await bus.publish("marks", "x", "to all", signal_id="sx")
    legacy = keys.acked("sx")
    await raw.hset(legacy, "old-writer", "1-0")  # no mark, no expiry: an older writer's
    assert await raw.ttl(legacy) == -1

    def receipt(coordinator: str) -> Receipt:
        return Receipt(keys=keys, coordinator=coordinator, channel="x", stream_id=x.stream_id,
                       signal_id="sx", iteration=1, started_ms=1)

    await store.read_groups([GroupRead(keys.channel("x"), c, True) for c in ("a", "b")])
    [ack_a] = await store.receive_many([receipt("a")])
    assert 0 < await raw.ttl(legacy) <= day
    assert await raw.hget(legacy, ACKED_EXPIRY_MARK) == b"1"
    await raw.expire(legacy, 1000)  # a marked hash keeps the expiry it has
    [ack_b] = await store.receive_many([receipt("b")])
    assert 990 < await raw.ttl(legacy) <= 1000
    assert await store.hgetall(legacy) == {"old-writer": "1-0", "a": ack_a, "b": ack_b,
                                           ACKED_EXPIRY_MARK: "1"}


@pytest.mark.parametrize(("key_id", "sig"), [
    ("k1", "c2lnbmF0dXJl"),
    ('k"1', 'quote " backslash \\ newline \n tab \t end'),
    ("ключ", "подпись ✓"),
])
async def test_the_ack_the_script_writes_decodes_to_what_was_given(
    bus: Bus, key_id: str, sig: str
) -> None:
    """The receive script writes its events' JSON itself: whatever the signing fields hold
    (quotes, backslashes, control characters, non-ASCII), the Ack decodes to exactly them,
    and the lifecycle event to the receipt's facts."""
    store, keys = bus._store, bus.keys("json")
    start = await store.begin_wait(keys, "a", "x", 60_000, 0)
    x = await bus.publish("json", "x", "hi", signal_id="sj")
    await store.read_groups([GroupRead(keys.channel("x"), "a", True)])
    [ack_id] = await store.receive_many([Receipt(
        keys=keys, coordinator="a", channel="x", stream_id=x.stream_id, signal_id="sj",
        iteration=start.iteration, started_ms=start.started_ms, key_id=key_id, sig=sig)])
    [(_, fields)] = await store.read_range(keys.acks)
    assert decode_fields(fields) == Ack(coordinator="a", signal_id="sj", channel="x",
                                        stream_id=x.stream_id, iteration=start.iteration,
                                        key_id=key_id, sig=sig)
    ends = [decode_fields(f) for _, f in await store.read_range(keys.events)]
    assert ends[-1] == BlockingEnded(coordinator="a", channel="x", iteration=start.iteration,
                                     outcome="signaled", signal_id="sj", stream_id=x.stream_id,
                                     started_ms=start.started_ms)
    assert ack_id
