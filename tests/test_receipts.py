"""The receive script with receipts grouped by entry: what a fan-out shares is written once, and
every receipt is still recorded once, whatever the grouping, repeats or retries."""

from __future__ import annotations

import pytest

from streambus import Bus
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
    assert await store.hgetall(keys.acked("sx")) == {"a": first[0], "b": first[2]}
    for coordinator, _ in waits:
        assert (await store.hgetall(keys.state(coordinator)))["state"] == "signaled"
