"""One benchmark session: a server (throwaway unless a URL is given), a bus, an admin client.

:func:`run` is the one way into it: it starts the server, runs the async body with SIGINT and
SIGTERM turned into :class:`~benchmarks.common.Interrupted` (so every child process and the
server are stopped on the way out), and turns benchmark errors into one line and an exit code.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import redis
import redis.asyncio as aioredis

import streambus
from benchmarks.common import raise_on_signal, server_facts, throwaway_server
from benchmarks.progress import Reporter
from streambus.server import binary_path

T = TypeVar("T")


@dataclass
class Session:
    """What every workload gets."""

    url: str
    namespace: str
    admin: Any
    bus: streambus.Bus
    reporter: Reporter
    external: bool
    server: dict[str, Any] = field(default_factory=dict)

    async def blocked_clients(self) -> int:
        return int((await self.admin.info("clients"))["blocked_clients"])

    async def used_memory(self) -> int:
        return int((await self.admin.info("memory"))["used_memory"])

    async def server_stats(self) -> tuple[float, dict[str, tuple[int, int]]]:
        """Server CPU seconds so far, and (calls, µs) per command (``INFO commandstats``;
        commands run by a script count both on their own and inside ``evalsha``)."""
        info = await self.admin.info("cpu", "commandstats")
        commands = {key.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
                    for key, v in info.items() if key.startswith("cmdstat_")}
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"]), commands


@contextlib.asynccontextmanager
async def open_session(url: str, *, external: bool, reporter: Reporter,
                       namespace: str | None = None) -> AsyncIterator[Session]:
    namespace = namespace or f"bench{os.getpid()}"
    admin: Any = aioredis.Redis.from_url(url, socket_timeout=30)
    try:
        async with streambus.connect(url, namespace=namespace) as bus:
            session = Session(url, namespace, admin, bus, reporter, external)
            session.server = await server_facts(admin)
            yield session
    finally:
        with anyio.CancelScope(shield=True):
            if external:
                await _delete_namespace(admin, namespace)
            await admin.aclose()


async def _delete_namespace(admin: Any, namespace: str) -> None:
    """Best effort, on a server we did not start: remove every key this run created."""
    with contextlib.suppress(redis.RedisError, OSError), anyio.move_on_after(30):
        async for key in admin.scan_iter(match=f"{namespace}:*", count=1000):
            await admin.unlink(key)


def run(body: Callable[[Session], Awaitable[T]], *, redis_url: str | None,
        reporter: Reporter) -> T:
    """Run ``body`` in a session; raises BenchmarkError (or a group of them) on failure."""
    with contextlib.ExitStack() as stack:
        url = redis_url or stack.enter_context(throwaway_server(binary_path()))
        return anyio.run(_main, body, url, redis_url is not None, reporter)


async def _main(body: Callable[[Session], Awaitable[T]], url: str, external: bool,
                reporter: Reporter) -> T:
    async with anyio.create_task_group() as tg:
        await tg.start(raise_on_signal)
        async with open_session(url, external=external, reporter=reporter) as session:
            result = await body(session)
        tg.cancel_scope.cancel()
    return result
