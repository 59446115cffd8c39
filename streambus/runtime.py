"""What one connected :class:`~streambus.Bus` shares with its coordinators: the store, the
heartbeat batcher, and the dispatchers (one per swarm, started on first use, retired when idle).

A long-running process that visits many swarms must not keep a task and a blocking connection
per swarm forever: a dispatcher with no waiter for ``idle_s`` is retired. A wait that arrives
meanwhile either takes a lease on the dispatcher before it is retired (the janitor re-checks the
leases under the lock before retiring), or finds it gone and starts a new one.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
import anyio.abc

from streambus.backoff import retry_within
from streambus.dispatch import Dispatcher
from streambus.keys import SwarmKeys
from streambus.liveness import BeatBatcher
from streambus.store import Store

T = TypeVar("T")


@dataclass(eq=False)
class _Served:
    dispatcher: Dispatcher
    scope: anyio.CancelScope
    leases: int = 0
    idle_since: float = 0.0


class Dispatchers:
    """The dispatchers of one bus, by swarm. Run :meth:`run` in a task group first."""

    def __init__(self, store: Store, *, block_ms: int, idle_s: float = 30.0) -> None:
        self._store = store
        self._block_ms = block_ms
        self.idle_s = idle_s
        self._served: dict[str, _Served] = {}
        self._lock = anyio.Lock()
        self._tg: anyio.abc.TaskGroup | None = None
        self.retired = 0

    def __repr__(self) -> str:
        return f"<Dispatchers swarms={sorted(self._served)} retired={self.retired}>"

    def get(self, swarm: str) -> Dispatcher | None:
        """The dispatcher serving ``swarm`` now, if any."""
        served = self._served.get(swarm)
        return served.dispatcher if served is not None else None

    def __len__(self) -> int:
        return len(self._served)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Host the dispatchers and retire idle ones, until cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            while True:
                await anyio.sleep(max(0.01, self.idle_s / 2))
                await self.retire_idle()

    @contextlib.asynccontextmanager
    async def lease(self, keys: SwarmKeys) -> AsyncIterator[Dispatcher]:
        """The dispatcher of ``keys.swarm``, kept from retiring while the block runs."""
        if self._tg is None:
            raise RuntimeError("use the Bus as an async context manager (async with connect())")
        async with self._lock:
            served = self._served.get(keys.swarm)
            if served is None:
                dispatcher = Dispatcher(self._store, keys, block_ms=self._block_ms)
                scope = anyio.CancelScope()
                await self._tg.start(self._serve, dispatcher, scope)
                served = self._served[keys.swarm] = _Served(dispatcher, scope)
            served.leases += 1
        try:
            yield served.dispatcher
        finally:
            served.leases -= 1
            if not served.leases:
                served.idle_since = anyio.current_time()

    async def retire_idle(self) -> int:
        """Retire every dispatcher without a lease for ``idle_s``; return how many."""
        cutoff = anyio.current_time() - self.idle_s
        async with self._lock:
            idle = [swarm for swarm, served in self._served.items()
                    if not served.leases and served.idle_since <= cutoff]
            for swarm in idle:
                self._served.pop(swarm).scope.cancel()
        self.retired += len(idle)
        return len(idle)

    @staticmethod
    async def _serve(dispatcher: Dispatcher, scope: anyio.CancelScope, *,
                     task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                     ) -> None:
        with scope:
            await dispatcher.run(task_status=task_status)


@dataclass(frozen=True, eq=False)
class Runtime:
    """The machinery a bus shares with its coordinators."""

    store: Store
    namespace: str
    dispatchers: Dispatchers
    beats: BeatBatcher
    retry_budget_s: float
    """How long an idempotent operation (publish, begin a wait) retries a lost connection."""
    unclaimed: dict[tuple[str, str], str] = field(default_factory=dict)
    """By (swarm prefix, coordinator): the token of a wait whose end could not be recorded, so
    it may hold a signal never handed over. The coordinator's next wait asks for it (on that
    channel) or parks it for that channel (on another)."""

    def keys(self, swarm: str) -> SwarmKeys:
        return SwarmKeys.for_swarm(self.namespace, swarm)

    async def retrying(self, operation: Callable[[], Awaitable[T]]) -> T:
        return await retry_within(operation, self.retry_budget_s)
