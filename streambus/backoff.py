"""The one retry policy: capped exponential backoff with full jitter, and the two loops built on
it. Every bus operation that is retried is retried through here.

Only :class:`~streambus.errors.BusUnavailable` (a connection lost, a server loading, failing
over or out of memory) is ever retried: it is the one error that a later attempt can cure.
Everything else is a verdict and goes to the caller at once.

The cap is small (0.5 s), so a server that comes back is used within half a second: the plan's
"reconnect in under 1 s after the server is reachable again" rests on it.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Final, NoReturn, TypeVar

import anyio

from streambus.errors import BusUnavailable

T = TypeVar("T")

BASE_S: Final = 0.02
CAP_S: Final = 0.5


def backoff_delay(attempt: int) -> float:
    """The delay before retry number ``attempt`` (0-based): full jitter under a capped
    exponential, so many clients that lost the same server do not come back in step."""
    return random.uniform(0, min(CAP_S, BASE_S * 2 ** min(attempt, 30)))


class Backoff:
    """Counts consecutive failures and sleeps the matching delay; :meth:`reset` on success."""

    __slots__ = ("attempt",)

    def __init__(self) -> None:
        self.attempt = 0

    def __repr__(self) -> str:
        return f"<Backoff attempt={self.attempt}>"

    def reset(self) -> None:
        self.attempt = 0

    async def sleep(self, limit: float | None = None) -> None:
        """Sleep before the next attempt (at most ``limit`` seconds), and count it."""
        delay = backoff_delay(self.attempt)
        self.attempt += 1
        await anyio.sleep(delay if limit is None else max(0.0, min(limit, delay)))


async def retry_within(operation: Callable[[], Awaitable[T]], budget: float) -> T:
    """Run an *idempotent* operation, retrying :class:`BusUnavailable` with backoff until
    ``budget`` seconds have passed since the first attempt; then the last error is raised."""
    backoff = Backoff()
    started = anyio.current_time()
    while True:
        try:
            return await operation()
        except BusUnavailable:
            if anyio.current_time() - started > budget:
                raise
            await backoff.sleep()


async def keep_running(
    step: Callable[[], Awaitable[object]],
    *,
    on_unavailable: Callable[[Exception], object] | None = None,
    on_recovered: Callable[[], object] | None = None,
    retry_on: tuple[type[Exception], ...] = (BusUnavailable,),
) -> NoReturn:
    """Run ``step`` forever (until cancelled). A ``retry_on`` error is reported to
    ``on_unavailable`` and followed by a backoff; the first success after failures is
    reported to ``on_recovered``. Any other error ends the loop."""
    backoff = Backoff()
    while True:
        try:
            await step()
        except retry_on as exc:
            if on_unavailable is not None:
                on_unavailable(exc)
            await backoff.sleep()
            continue
        if backoff.attempt and on_recovered is not None:
            on_recovered()
        backoff.reset()
