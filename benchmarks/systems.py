"""The signalling systems a fan-out compares: streambus and the baselines, both ends of each.

Each system has a *waiter set* (the receiving side, in a worker process: one waiter per
coordinator) and a *send* (the signalling side, in the parent). Every baseline waiter owns its
connection, as a coordinator that does not share a dispatcher must:

- ``streambus``: ``bus.wait_for`` per coordinator; the library multiplexes every waiter of a
  process over one blocking connection (its dispatcher). Sent with ``bus.publish``.
- ``streambus-ack``: the same waiters; the sender publishes with ``await_acks`` naming all N
  coordinators and also records publish-to-all-acknowledged.
- ``xreadgroup``: bare redis-py, one consumer group per waiter on one stream, ``XREADGROUP
  BLOCK 2000 COUNT 1`` then ``XACK``. Sent with ``XADD``. The floor for our client stack.
- ``blpop``: one wake-up list per waiter, ``BLPOP``; the sender ``LPUSH``es to every list (one
  pipeline).
- ``pubsub``: every waiter ``SUBSCRIBE``s one channel; the sender ``PUBLISH``es. Fast, but a
  signal sent before a waiter subscribed is lost (see the ``pubsub-loss`` workload).
- ``poll-<interval>``: the plan's original mechanism: the sender ``SETEX``es a signal key
  (``coordination:signal:<id>:complete``); each waiter ``GET``s it every interval, from a
  random phase (as independent coordinators would), over a shared pool of connections.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import redis.asyncio as aioredis

import streambus
from benchmarks.children import child_url
from benchmarks.common import now_us

STREAMBUS: Final = "streambus"
STREAMBUS_ACK: Final = "streambus-ack"
XREADGROUP: Final = "xreadgroup"
BLPOP: Final = "blpop"
PUBSUB: Final = "pubsub"
CONNECTED: Final = (XREADGROUP, BLPOP, PUBSUB)
"""Systems that hold one server connection per waiter."""
BLOCK_MS: Final = 2000
CONNECT_CONCURRENCY: Final = 64
POLL_POOL: Final = 64


def poll_interval(system: str) -> float | None:
    """``poll-100ms`` -> 0.1, ``poll-5s`` -> 5.0; ``None`` for other systems."""
    if not system.startswith("poll-"):
        return None
    text = system.removeprefix("poll-")
    if text.endswith("ms"):
        return float(text[:-2]) / 1000
    return float(text.removesuffix("s"))


def label(system: str) -> str:
    """How the report names a system."""
    if (interval := poll_interval(system)) is not None:
        every = f"{interval * 1000:g} ms" if interval < 1 else f"{interval:g} s"
        return f"SETEX + GET poll every {every}"
    return {STREAMBUS: "streambus", STREAMBUS_ACK: "streambus (publish awaits all ACKs)",
            XREADGROUP: "bare XREADGROUP, group per waiter", BLPOP: "BLPOP wake-up lists",
            PUBSUB: "pub/sub"}.get(system, system)


@dataclass(frozen=True, slots=True)
class Names:
    """Every name one fan-out scenario uses (keys of the baselines are benchmark-only)."""

    namespace: str
    scenario: str
    channel: str = "done"

    @property
    def swarm(self) -> str:
        return f"bench-{self.scenario}"

    @property
    def stream(self) -> str:
        return f"{self.namespace}:{self.scenario}:xreadgroup"

    @property
    def pubsub_channel(self) -> str:
        return f"{self.namespace}:{self.scenario}:pubsub"

    def blpop_key(self, coordinator: str) -> str:
        return f"{self.namespace}:{self.scenario}:blpop:{coordinator}"

    def poll_key(self, system: str, round_: int) -> str:
        return (f"{self.namespace}:coordination:signal:{self.scenario}-{system}-{round_}"
                ":complete")

    @staticmethod
    def coordinator(index: int) -> str:
        return f"c{index}"

    @staticmethod
    def group(coordinator: str) -> str:
        return f"g-{coordinator}"


def payload(system: str, round_: int, sent: int) -> dict[str, Any]:
    return {"system": system, "round": round_, "sent": sent}


@dataclass
class RoundResult:
    """What the waiters of one process saw in one round."""

    latencies_us: list[int] = field(default_factory=list)
    stale: int = 0
    """Signals of another round (a leftover); they are skipped, never counted."""

    def take(self, message: dict[str, Any], system: str, round_: int) -> bool:
        """Record ``message`` if it is this round's signal; False when it is a leftover."""
        if message.get("round") != round_ or message.get("system") != system:
            self.stale += 1
            return False
        self.latencies_us.append(now_us() - int(message["sent"]))
        return True


class Waiters:
    """The receiving side of one system in one worker: one waiter per coordinator."""

    def __init__(self, system: str, names: Names, coordinators: Sequence[str]) -> None:
        self.system = system
        self.names = names
        self.coordinators = list(coordinators)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.system} x{len(self.coordinators)}>"

    async def open(self) -> None:
        """Set up connections (not measured)."""

    def armed(self) -> bool:
        """True once every waiter is ready as far as this process can tell."""
        return True

    async def receive(self, round_: int, timeout: float, result: RoundResult) -> None:
        """Every waiter receives this round's signal (or the timeout passes)."""
        async with anyio.create_task_group() as tg:
            for coordinator in self.coordinators:
                tg.start_soon(self._receive_one, coordinator, round_, timeout, result)

    async def _receive_one(self, coordinator: str, round_: int, timeout: float,
                           result: RoundResult) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        """Close connections. Safe to call twice."""


class StreambusWaiters(Waiters):
    def __init__(self, system: str, names: Names, coordinators: Sequence[str],
                 bus: streambus.Bus) -> None:
        super().__init__(system, names, coordinators)
        self.bus = bus

    def armed(self) -> bool:
        """Every waiter registered with the dispatcher, served, and the dispatcher blocked.

        Reads the process's dispatcher (not measured; the parent also waits until the server
        counts the dispatcher's read as blocked).
        """
        dispatcher = self.bus._runtime.dispatchers.get(self.names.swarm)
        return (dispatcher is not None and dispatcher.waiters >= len(self.coordinators)
                and dispatcher.quiescent)

    async def _receive_one(self, coordinator: str, round_: int, timeout: float,
                           result: RoundResult) -> None:
        with contextlib.suppress(streambus.WaitTimeout):
            deadline = anyio.current_time() + timeout
            while anyio.current_time() < deadline:
                delivery = await self.bus.wait_for(
                    self.names.swarm, coordinator, self.names.channel,
                    timeout=max(0.01, deadline - anyio.current_time()))
                if result.take(delivery.signal.payload, self.system, round_):
                    return


class ConnectedWaiters(Waiters):
    """Waiters that each own a connection."""

    clients: list[Any]

    async def open(self) -> None:
        url = child_url()
        self.clients = [aioredis.Redis.from_url(url, single_connection_client=True,
                                                socket_timeout=BLOCK_MS / 1000 + 8)
                        for _ in self.coordinators]
        await _bounded_each(self.clients, lambda client: client.ping())

    async def aclose(self) -> None:
        for client in getattr(self, "clients", []):
            with contextlib.suppress(Exception):
                await client.aclose()
        self.clients = []

    async def receive(self, round_: int, timeout: float, result: RoundResult) -> None:
        async with anyio.create_task_group() as tg:
            for coordinator, client in zip(self.coordinators, self.clients, strict=True):
                tg.start_soon(self._receive_on, client, coordinator, round_, timeout, result)

    async def _receive_on(self, client: Any, coordinator: str, round_: int, timeout: float,
                          result: RoundResult) -> None:
        raise NotImplementedError


class XreadgroupWaiters(ConnectedWaiters):
    async def _receive_on(self, client: Any, coordinator: str, round_: int, timeout: float,
                          result: RoundResult) -> None:
        stream, group = self.names.stream, self.names.group(coordinator)
        with anyio.move_on_after(timeout):
            while True:
                reply = await client.xreadgroup(group, coordinator, {stream: ">"}, count=1,
                                                block=BLOCK_MS)
                if not reply:
                    continue
                entry_id, fields = reply[0][1][0]
                message = json.loads(fields[b"m"])
                await client.xack(stream, group, entry_id)
                if result.take(message, XREADGROUP, round_):
                    return


class BlpopWaiters(ConnectedWaiters):
    async def _receive_on(self, client: Any, coordinator: str, round_: int, timeout: float,
                          result: RoundResult) -> None:
        key = self.names.blpop_key(coordinator)
        with anyio.move_on_after(timeout):
            while True:
                reply = await client.blpop([key], timeout=BLOCK_MS / 1000)
                if reply and result.take(json.loads(reply[1]), BLPOP, round_):
                    return


class PubsubWaiters(ConnectedWaiters):
    """Each waiter holds a subscribed connection for as long as the system is open."""

    async def open(self) -> None:
        url = child_url()
        self.clients = [aioredis.Redis.from_url(url) for _ in self.coordinators]
        self.subscriptions: list[Any] = [client.pubsub() for client in self.clients]
        channel = self.names.pubsub_channel

        async def subscribe(subscription: Any) -> None:
            await subscription.subscribe(channel)
            # Read the confirmation: the subscription is in force once it arrived.
            with anyio.fail_after(10):
                while True:
                    reply = await subscription.get_message(timeout=1.0)
                    if reply is not None and reply.get("type") == "subscribe":
                        return

        await _bounded_each(self.subscriptions, subscribe)

    async def aclose(self) -> None:
        for subscription in getattr(self, "subscriptions", []):
            with contextlib.suppress(Exception):
                await subscription.aclose()
        self.subscriptions = []
        await super().aclose()

    async def receive(self, round_: int, timeout: float, result: RoundResult) -> None:
        async with anyio.create_task_group() as tg:
            for subscription in self.subscriptions:
                tg.start_soon(self._listen, subscription, round_, timeout, result)

    async def _listen(self, subscription: Any, round_: int, timeout: float,
                      result: RoundResult) -> None:
        with anyio.move_on_after(timeout):
            while True:
                message = await subscription.get_message(ignore_subscribe_messages=True,
                                                         timeout=BLOCK_MS / 1000)
                if (message and message.get("type") == "message"
                        and result.take(json.loads(message["data"]), PUBSUB, round_)):
                    return


class PollWaiters(Waiters):
    """The plan's mechanism: ``GET`` the signal key every interval until it is there."""

    async def open(self) -> None:
        self.interval = poll_interval(self.system) or 5.0
        pool = aioredis.BlockingConnectionPool.from_url(
            child_url(), max_connections=min(POLL_POOL, len(self.coordinators)), timeout=None)
        self.client: Any = aioredis.Redis.from_pool(pool)

    async def aclose(self) -> None:
        if (client := getattr(self, "client", None)) is not None:
            with contextlib.suppress(Exception):
                await client.aclose()
            self.client = None

    async def _receive_one(self, coordinator: str, round_: int, timeout: float,
                           result: RoundResult) -> None:
        key = self.names.poll_key(self.system, round_)
        with anyio.move_on_after(timeout):
            await anyio.sleep(random.uniform(0, self.interval))  # an independent phase
            while True:
                value = await self.client.get(key)
                if value is not None and result.take(json.loads(value), self.system, round_):
                    return
                await anyio.sleep(self.interval)


def waiters_for(system: str, names: Names, coordinators: Sequence[str],
                bus: streambus.Bus) -> Waiters:
    if system in (STREAMBUS, STREAMBUS_ACK):
        return StreambusWaiters(system, names, coordinators, bus)
    if system == XREADGROUP:
        return XreadgroupWaiters(system, names, coordinators)
    if system == BLPOP:
        return BlpopWaiters(system, names, coordinators)
    if system == PUBSUB:
        return PubsubWaiters(system, names, coordinators)
    if poll_interval(system) is not None:
        return PollWaiters(system, names, coordinators)
    raise ValueError(f"unknown system {system!r}")


async def _bounded_each(items: Sequence[Any], action: Callable[[Any], Any]) -> None:
    """Run ``action`` on every item, at most CONNECT_CONCURRENCY at a time (connect storms
    overflow the server's accept backlog and cost seconds in SYN retransmits)."""
    limiter = anyio.CapacityLimiter(CONNECT_CONCURRENCY)

    async def one(item: Any) -> None:
        async with limiter:
            await action(item)

    async with anyio.create_task_group() as tg:
        for item in items:
            tg.start_soon(one, item)


# -- the sending side (parent) -----------------------------------------------------------------


@dataclass
class Sender:
    """Sends one round's signal through one system; returns the sender-side sample (µs) for
    ``streambus-ack`` (publish to all acknowledged), else ``None``."""

    bus: streambus.Bus
    admin: Any
    names: Names
    coordinators: list[str]

    async def send(self, system: str, round_: int) -> int | None:
        sent = now_us()
        message = payload(system, round_, sent)
        if system == STREAMBUS:
            await self.bus.publish(self.names.swarm, self.names.channel, message,
                                   sender="bench")
        elif system == STREAMBUS_ACK:
            await self.bus.publish(self.names.swarm, self.names.channel, message,
                                   sender="bench", await_acks=self.coordinators,
                                   ack_timeout=120)
            return now_us() - sent
        elif system == XREADGROUP:
            await self.admin.xadd(self.names.stream, {"m": json.dumps(message)})
        elif system == BLPOP:
            raw = json.dumps(message)
            async with self.admin.pipeline(transaction=False) as pipe:
                for coordinator in self.coordinators:
                    pipe.lpush(self.names.blpop_key(coordinator), raw)
                await pipe.execute()
        elif system == PUBSUB:
            await self.admin.publish(self.names.pubsub_channel, json.dumps(message))
        elif poll_interval(system) is not None:
            await self.admin.setex(self.names.poll_key(system, round_), 600, json.dumps(message))
        else:
            raise ValueError(f"unknown system {system!r}")
        return None

    async def prepare(self, systems: Sequence[str]) -> None:
        """Baseline state created before any waiter runs (not measured)."""
        if XREADGROUP in systems:
            async with self.admin.pipeline(transaction=False) as pipe:
                for coordinator in self.coordinators:
                    pipe.xgroup_create(self.names.stream, self.names.group(coordinator),
                                       id="$", mkstream=True)
                await pipe.execute()
        if BLPOP in systems:
            async with self.admin.pipeline(transaction=False) as pipe:
                for coordinator in self.coordinators:
                    pipe.delete(self.names.blpop_key(coordinator))
                await pipe.execute()
