"""Redis errors into streambus errors: one table, applied here and nowhere else.

An error *reply* is told apart by its code, the first word of the reply (redis-py keeps it as
``status_code`` on the classes it maps, and leaves it at the head of the message otherwise).
A client-side failure (a lost connection, a refused authentication, garbage on the wire) is told
apart by its class. Everything a later attempt can cure becomes
:class:`~streambus.errors.BusUnavailable`, which the one retry policy (``streambus.backoff``)
retries; everything else is a verdict.

Errors raised by ``redis.call`` inside a script keep their code (Redis >= 7 and Valkey), with
the script's name and line appended; that suffix is dropped here, since a user has no use for
a line number of ours.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Final

import redis.exceptions as rex

from streambus.errors import BusUnavailable, NotPermitted, StreambusError


class GroupMissing(StreambusError):
    """A consumer group (or its stream) is gone: deleted, or lost in a restart without AOF."""


class GroupExists(StreambusError):
    """``XGROUP CREATE`` of a group that exists (``BUSYGROUP``): the store treats it as done."""


class KeyMissing(StreambusError):
    """A command that needs the key found none (``ERR no such key``, from ``XINFO``)."""


class UnknownCommand(StreambusError):
    """The server does not know a command (an older version)."""


class ScriptMissing(StreambusError):
    """The server does not have a script (``NOSCRIPT``): the script runner loads it."""


def _unavailable(why: str) -> Callable[[str], StreambusError]:
    return lambda message: BusUnavailable(f"{why}: {message}")


_BY_CODE: Final[dict[str, Callable[[str], StreambusError]]] = {
    "NOGROUP": GroupMissing,
    "BUSYGROUP": GroupExists,
    "NOSCRIPT": ScriptMissing,
    # A server that cannot serve right now, or no longer serves these keys: try again (after
    # re-resolving the topology, which a new connection does).
    "LOADING": _unavailable("Redis not ready (loading its data)"),
    "BUSY": _unavailable("Redis busy (a script runs too long)"),
    "READONLY": _unavailable("Redis node is a replica now (failover)"),
    "MASTERDOWN": _unavailable("Redis replica lost its master"),
    "TRYAGAIN": _unavailable("Redis cluster is moving keys"),
    "CLUSTERDOWN": _unavailable("Redis cluster is down"),
    "MOVED": _unavailable("Redis cluster moved the keys"),
    "ASK": _unavailable("Redis cluster is moving the keys"),
    # CLIENT UNBLOCK as streambus sends it ends a read as a timeout, with no error: an
    # UNBLOCKED error is the server's, when a failover or a resharding ends a blocked read.
    "UNBLOCKED": _unavailable("Redis ended a blocked read (failover or resharding)"),
    # Transient by design: TTLs expire and trims run, so callers retry within budgets.
    "OOM": _unavailable("Redis out of memory (maxmemory reached)"),
    "NOPERM": lambda message: NotPermitted(f"not permitted by the server's ACL: {message}"),
    "WRONGPASS": lambda message: NotPermitted(f"authentication failed: {message}"),
    "NOAUTH": lambda message: NotPermitted(f"authentication required: {message}"),
}

_BY_CLASS: Final[tuple[tuple[type[Exception], Callable[[str], StreambusError]], ...]] = (
    # Before ConnectionError: redis-py raises these as connection errors, but no retry cures
    # a wrong password.
    (rex.AuthenticationError, lambda m: NotPermitted(f"authentication failed: {m}")),
    (rex.AuthorizationError, lambda m: NotPermitted(f"authentication failed: {m}")),
    (rex.BusyLoadingError, _unavailable("Redis not ready (loading its data)")),
    (rex.ConnectionError, _unavailable("Redis unreachable")),
    (rex.TimeoutError, _unavailable("Redis unreachable")),
    (OSError, _unavailable("Redis unreachable")),
    (rex.InvalidResponse, _unavailable("Redis connection broken (invalid reply)")),
    (rex.SlotNotCoveredError, _unavailable("Redis cluster does not cover the slot")),
    (rex.ClusterError, _unavailable("Redis cluster unavailable")),
    (rex.RedisClusterException, _unavailable("Redis cluster unavailable")),
)

_CODE: Final = re.compile(r"[A-Z][A-Z_-]+")
_SCRIPT_SUFFIX: Final = re.compile(r"\s*script: \w+, on @user_script:\d+\.?$")


def error_code(exc: rex.ResponseError) -> str:
    """The error reply's code (``NOGROUP``, ``READONLY``, ...); ``""`` when it has none."""
    status: str | None = getattr(exc, "status_code", None)
    if status:
        return status
    first = str(exc).split(" ", 1)[0]
    return first if _CODE.fullmatch(first) else ""


def translate(exc: BaseException) -> BaseException:
    """The streambus error for ``exc`` (anything not from redis-py is returned as is)."""
    if isinstance(exc, rex.ResponseError):
        code, message = error_code(exc), _SCRIPT_SUFFIX.sub("", str(exc))
        if (make := _BY_CODE.get(code)) is not None:
            return make(message)
        if code == "ERR" and message.endswith("no such key"):
            return KeyMissing(message)
        if code == "ERR" and "unknown command" in message:
            return UnknownCommand(f"the server does not support a command streambus needs: "
                                  f"{message}")
        return StreambusError(f"Redis error: {message}")
    for kind, make in _BY_CLASS:
        if isinstance(exc, kind):
            return make(str(exc))
    if isinstance(exc, rex.RedisError):
        return StreambusError(f"Redis client error: {exc}")
    return exc


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Raise every redis-py error inside the block as its streambus error."""
    try:
        yield
    except (rex.RedisError, rex.RedisClusterException, OSError) as exc:
        raise translate(exc) from exc
