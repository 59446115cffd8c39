"""A signal sent *before* the waiter starts: who still delivers it?

The race the plan's design lost: a validator signals before the coordinator began waiting.
Each trial sends first and only then starts one waiter, which waits up to ``window`` for it:

- ``streambus``: ``publish``, then ``wait_for`` by a coordinator that never waited before (its
  group is created at the start of the stream, so the earlier signal is there for it).
- ``pubsub``: ``PUBLISH``, then ``SUBSCRIBE``: pub/sub keeps nothing, the signal is lost.
- ``xreadgroup``: ``XADD``, then the group is created at ``$`` (the bare baseline's way):
  lost too, which is why streambus creates groups at ``0``.
- ``blpop`` (the list keeps it) and ``poll`` (the ``SETEX`` key keeps it until its TTL).

Latency here is send to receive for the late waiter, on the harness's one clock.
"""

from __future__ import annotations

import json
from typing import Any, Final

import anyio

from benchmarks.common import load_average, now_us, summarize
from benchmarks.session import Session

SYSTEMS: Final = ("streambus", "pubsub", "xreadgroup", "blpop", "poll")
SWARM: Final = "bench-loss"


async def run_loss(session: Session, trials: int, window_s: float = 0.25) -> dict[str, Any]:
    load_start = load_average()
    results: dict[str, dict[str, Any]] = {}
    for system in SYSTEMS:
        latencies: list[int] = []
        lost = 0
        for trial in range(trials):
            with anyio.move_on_after(window_s):
                latencies.append(await _late_waiter(session, system, trial))
                continue
            lost += 1
        results[system] = {"trials": trials, "lost": lost, "delivered": len(latencies),
                           "late_waiter_latency": summarize(latencies)}
        session.reporter.advance(f"{system}: {lost} of {trials} signals lost when sent before "
                                 "the waiter started")
    return {"workload": "pubsub-loss", "title": "signal sent before the waiter started",
            "window_s": window_s, "systems": results,
            "load_average": {"start": load_start, "end": load_average()}}


async def _late_waiter(session: Session, system: str, trial: int) -> int:
    """Send, then start a waiter; return its latency (µs). Cancelled by the caller's window."""
    admin, ns = session.admin, session.namespace
    key = f"{ns}:loss:{system}:{trial}"
    sent = now_us()
    message = json.dumps({"sent": sent})
    if system == "streambus":
        await session.bus.publish(SWARM, f"late{trial}", {"sent": sent}, sender="bench")
        delivery = await session.bus.wait_for(SWARM, f"late-{trial}", f"late{trial}",
                                              timeout=60)
        return now_us() - int(delivery.signal.payload["sent"])
    if system == "pubsub":
        await admin.publish(key, message)
        async with admin.pubsub() as subscription:
            await subscription.subscribe(key)
            while True:
                reply = await subscription.get_message(ignore_subscribe_messages=True,
                                                       timeout=1.0)
                if reply is not None and reply.get("type") == "message":
                    return now_us() - int(json.loads(reply["data"])["sent"])
    if system == "xreadgroup":
        await admin.xadd(key, {"m": message})
        await admin.xgroup_create(key, "late", id="$", mkstream=True)
        while True:
            reply = await admin.xreadgroup("late", "c", {key: ">"}, count=1, block=100)
            if reply:
                return now_us() - int(json.loads(reply[0][1][0][1][b"m"])["sent"])
    if system == "blpop":
        await admin.lpush(key, message)
        reply = await admin.blpop([key], timeout=1)
        return now_us() - int(json.loads(reply[1])["sent"])
    await admin.setex(key, 60, message)
    value = await admin.get(key)  # a poller's first GET
    return now_us() - int(json.loads(value)["sent"])
