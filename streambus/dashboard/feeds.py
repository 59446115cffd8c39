"""Live feeds: one poller per page kind, fanned out to every browser that watches it.

The Redis cost of the dashboard is bounded by the number of *distinct* pages being watched
(the overview, and each swarm someone has open), never by the number of browsers: a
:class:`Feed` reads the bus once per ``interval`` and every subscriber gets its latest payload.
A slow subscriber skips payloads it had no time to send (it only ever needs the newest).

A feed starts with its first subscriber and stops ``linger`` seconds after its last one left.
A read that fails (Redis unreachable, too slow) publishes an ``unavailable`` payload instead of
a snapshot, and the next successful read replaces it: the page recovers by itself.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Final

import anyio
import anyio.abc
import msgspec

from streambus.errors import StreambusError

log = logging.getLogger(__name__)

READ_TIMEOUT_S: Final = 5.0
"""A read slower than this is reported as the bus being unavailable."""

Read = Callable[[], Awaitable[dict[str, Any]]]
Message = tuple[str, str]
"""An SSE event name (``snapshot``, ``unavailable``) and its JSON data."""

_encoder: Final = msgspec.json.Encoder()


class Feed:
    """One poller whose latest payload every subscriber receives."""

    def __init__(self, key: str, read: Read, *, interval: float, linger: float) -> None:
        self.key = key
        self.read = read
        self.interval = interval
        self.linger = linger
        self.latest: Message | None = None
        self.version = 0
        self.subscribers = 0
        self.reads = 0
        self.closed = False
        self._changed = anyio.Event()

    def __repr__(self) -> str:
        return (f"<Feed {self.key!r} subscribers={self.subscribers} reads={self.reads}"
                f"{' closed' if self.closed else ''}>")

    async def run(self, on_stop: Callable[[Feed], None]) -> None:
        """Poll until closed or unwatched for ``linger`` s; ``on_stop`` runs before returning,
        with no await in between, so no subscriber can join a feed that has stopped."""
        unwatched_since: float | None = None
        try:
            while not self.closed:
                self._publish(await self._read_once())
                now = anyio.current_time()
                if self.subscribers:
                    unwatched_since = None
                elif unwatched_since is None:
                    unwatched_since = now
                elif now - unwatched_since >= self.linger:
                    return
                await anyio.sleep(self.interval)
        finally:
            on_stop(self)
            self.close()

    async def _read_once(self) -> Message:
        self.reads += 1
        try:
            with anyio.fail_after(READ_TIMEOUT_S):
                snapshot = await self.read()
        except TimeoutError:
            return _message("unavailable", {"message": "the bus did not answer in time"})
        except StreambusError as exc:
            return _message("unavailable", {"message": str(exc)})
        except Exception as exc:  # a bug of ours: the page says so, the server keeps running
            log.exception("dashboard feed %s failed", self.key)
            return _message("unavailable", {"message": f"dashboard error: {exc!r}"})
        return _message("snapshot", snapshot)

    def _publish(self, message: Message) -> None:
        self.latest = message
        self.version += 1
        self._changed.set()
        self._changed = anyio.Event()

    def close(self) -> None:
        """End every subscription (the server is shutting down, or nobody watches)."""
        self.closed = True
        self._changed.set()

    async def messages(self) -> AsyncGenerator[Message, None]:
        """The latest payload now (if any), then each newer one, until the feed closes."""
        self.subscribers += 1
        seen = 0
        try:
            while not self.closed:
                if self.latest is not None and self.version != seen:
                    seen = self.version
                    yield self.latest
                else:
                    await self._changed.wait()
        finally:
            self.subscribers -= 1


def _message(event: str, data: dict[str, Any]) -> Message:
    return event, _encoder.encode(data).decode()


class Hub:
    """The feeds of one dashboard server, run in its task group."""

    def __init__(self, *, interval: float, linger: float = 5.0) -> None:
        self.interval = interval
        self.linger = linger
        self.feeds: dict[str, Feed] = {}
        self._tg: anyio.abc.TaskGroup | None = None

    def __repr__(self) -> str:
        return f"<Hub feeds={sorted(self.feeds)}>"

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Run the feeds until cancelled."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self._tg = None
            self.close()

    def feed(self, key: str, read: Callable[[], Read]) -> Feed:
        """The running feed of ``key``, started (with the reader ``read()`` makes) if needed."""
        if (found := self.feeds.get(key)) is not None:
            return found
        if self._tg is None:
            raise StreambusError("the dashboard is shutting down")
        feed = Feed(key, read(), interval=self.interval, linger=self.linger)
        self.feeds[key] = feed
        self._tg.start_soon(feed.run, self._forget)
        return feed

    def _forget(self, feed: Feed) -> None:
        if self.feeds.get(feed.key) is feed:
            del self.feeds[feed.key]

    def close(self) -> None:
        """End every subscription now."""
        for feed in list(self.feeds.values()):
            feed.close()
