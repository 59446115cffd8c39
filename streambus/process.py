"""What every streambus process shares (the CLI, the demo's agents, the consumers): exit codes,
and running work that SIGINT/SIGTERM cancel cleanly.

This module sits below all of them and imports nothing of theirs.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

import anyio

from streambus.errors import (
    Backpressure,
    BusUnavailable,
    InvalidInput,
    NotPermitted,
    PeerDead,
    StreambusError,
    WaitTimeout,
)

T = TypeVar("T")

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_TIMEOUT: Final = 2
EXIT_PEER_DEAD: Final = 3
EXIT_UNAVAILABLE: Final = 4
EXIT_BACKPRESSURE: Final = 5
EXIT_USAGE: Final = 64
EXIT_NOT_PERMITTED: Final = 77
"""Authentication failed, or the server's ACL refused a command or key (sysexits' EX_NOPERM)."""

_EXIT_CODES: Final[tuple[tuple[type[StreambusError], int], ...]] = (
    (InvalidInput, EXIT_USAGE),
    (NotPermitted, EXIT_NOT_PERMITTED),
    (WaitTimeout, EXIT_TIMEOUT),
    (PeerDead, EXIT_PEER_DEAD),
    (Backpressure, EXIT_BACKPRESSURE),
    (BusUnavailable, EXIT_UNAVAILABLE),
    (StreambusError, EXIT_ERROR),
)
"""The exit code of each error, most specific first."""


def exit_code_of(error: StreambusError) -> int:
    """The process exit code that reports ``error``."""
    return next(code for kind, code in _EXIT_CODES if isinstance(error, kind))


@dataclass
class Interruptible(Generic[T]):
    """What :func:`run_interruptible` saw: the result, or the signal that cut the work short."""

    result: T | None = None
    signum: int | None = None


async def run_interruptible(work: Callable[[], Awaitable[T]]) -> Interruptible[T]:
    """Run ``work``; SIGINT/SIGTERM cancel it, so a wait in it records ``cancelled``.

    A :class:`StreambusError` from ``work`` is raised as itself (outside the task group that
    watches the signals, so never wrapped in an ExceptionGroup).
    """
    outcome: Interruptible[T] = Interruptible()
    failure: StreambusError | None = None
    async with anyio.create_task_group() as tg:

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    outcome.signum = signum
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch_signals)
        try:
            outcome.result = await work()
        except StreambusError as exc:
            failure = exc
        tg.cancel_scope.cancel()
    if failure is not None and outcome.signum is None:
        raise failure
    return outcome
