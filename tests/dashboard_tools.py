"""Running the dashboard in a test, and reading its live feed the way a browser does."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx

from streambus.bus import Bus
from streambus.dashboard import DashboardOptions, serve
from streambus.dashboard.feeds import Hub

FAST = DashboardOptions(dead_after=1.0, interval=0.1)
"""Test options: a poll every 0.1 s, dead after 1 s of silence."""


@contextlib.asynccontextmanager
async def running_dashboard(bus: Bus, options: DashboardOptions = FAST
                            ) -> AsyncIterator[tuple[str, Hub]]:
    """The dashboard of ``bus`` on a free port: its URL (ending in ``/``) and its feeds' hub."""
    hub = Hub(interval=options.interval)
    async with anyio.create_task_group() as tg:
        url = await tg.start(lambda task_status: serve(
            bus, options, host="127.0.0.1", port=0, hub=hub, task_status=task_status))
        try:
            yield url, hub
        finally:
            tg.cancel_scope.cancel()


class Feed:
    """A live feed read as a browser's EventSource does: one ``(event, data)`` at a time."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self) -> tuple[str, Any]:
        event, data = "message", ""
        async for line in self._lines:
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
            elif not line and data:
                return event, json.loads(data)
        raise AssertionError("the feed ended")

    async def until(self, check: Callable[[str, Any], bool], timeout: float = 10.0
                    ) -> tuple[str, Any]:
        """The first event for which ``check(event, data)`` holds (bounded)."""
        seen: tuple[str, Any] | None = None
        with anyio.move_on_after(timeout):
            while True:
                seen = await self.next()
                if check(*seen):
                    return seen
        raise AssertionError(f"no such event in {timeout} s; last seen {seen!r}")


@contextlib.asynccontextmanager
async def feed(client: httpx.AsyncClient, path: str) -> AsyncIterator[Feed]:
    async with client.stream("GET", path) as response:
        assert response.status_code == 200, response.status_code
        assert response.headers["content-type"].startswith("text/event-stream")
        yield Feed(response)


def rows(snapshot: Any) -> dict[str, dict[str, Any]]:
    return {row["coordinator"]: row for row in snapshot["rows"]}
