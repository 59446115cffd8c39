"""Redis errors into streambus errors: one table, applied here and nowhere else.

An error *reply* is told apart by its code, the first word of the reply (redis-py keeps it as
``status_code`` on the classes it maps, and leaves it at the head of the message otherwise).
A client-side failure (a lost connection, a refused authentication, garbage on the wire) is told
apart by its class. Everything a later attempt can cure becomes
:class:`~streambus.errors.BusUnavailable`, which the one retry policy (``streambus.backoff``)
retries; everything else is a verdict.

Errors raised by ``redis.call`` inside a script keep their code (Redis >= 7 and Valkey), with
the script's name and line appended; that suffix is dropped here, since a user has no use for
a line number of ours. An ACL refusal inside a script is the exception: both servers report it
as a plain ``ERR`` with a message of their own, recognised below.

Refusals (a wrong password, an ACL that does not allow a command or a key) become
:class:`~streambus.errors.NotPermitted`, one line naming the user and the command and keys
refused; the store records which command that was (:func:`remember_command`), since Redis 7.0
names neither the key nor, inside a script, the command.
"""

from __future__ import annotations

import contextlib
import re
import ssl
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

import redis.exceptions as rex

from streambus.errors import BusUnavailable, CertificateRejected, NotPermitted, StreambusError


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
}

_REFUSED: Final = frozenset({"NOPERM"})
_AUTH_FAILED: Final = frozenset({"WRONGPASS", "NOAUTH"})
_REFUSED_IN_SCRIPT: Final = (
    "ACL failure in script",  # Valkey
    "The user executing the script can't",  # Redis 7
)

_BY_CLASS: Final[tuple[tuple[type[Exception], Callable[[str], StreambusError]], ...]] = (
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
_SCRIPT_SUFFIX: Final = re.compile(r"\s*script: (?:\w+, )?on @user_script:\d+\.?$")
_PIPELINED: Final = re.compile(
    r"Command # \d+ \((?P<command>.*)\) of pipeline caused error: (?P<error>.*)", re.DOTALL)
_NO_PASSWORD: Final = ("HELLO must be called with the client already authenticated",
                       "Authentication required")
_SCRIPT_NAMES: dict[str, str] = {}
"""Script SHA1 -> name, so a refused ``EVALSHA`` names the script (filled by the runner)."""
_COMMAND_ATTR: Final = "_streambus_command"


def name_script(sha: str, name: str) -> None:
    """Let refusals of ``EVALSHA sha`` name the script ``name``."""
    _SCRIPT_NAMES[sha] = name


def remember_command(exc: BaseException, args: Sequence[Any]) -> None:
    """Record on ``exc`` the command (its arguments) that the server refused with it."""
    with contextlib.suppress(AttributeError):
        setattr(exc, _COMMAND_ATTR, describe_command(args))


def describe_command(args: Sequence[Any]) -> str:
    """A command as a refusal names it: the command, and its keys where they are known
    (``EVALSHA`` as ``script NAME`` with its declared keys). Never its values."""
    words = [a.decode(errors="replace") if isinstance(a, bytes) else str(a) for a in args]
    if not words:
        return ""
    name, rest = words[0].upper(), words[1:]
    if name.startswith(("EVAL", "FCALL")) and len(rest) >= 2 and rest[1].isdigit():
        what = (f"script {_SCRIPT_NAMES[rest[0]]!r}" if rest[0] in _SCRIPT_NAMES
                else f"a script ({name})")
        keys = rest[2:2 + int(rest[1])]
    elif name in ("XREAD", "XREADGROUP") and "STREAMS" in (u := [w.upper() for w in rest]):
        after = rest[u.index("STREAMS") + 1:]
        what, keys = name, after[: len(after) // 2]
    elif name in ("CLIENT", "CLUSTER", "SCRIPT", "CONFIG", "ACL", "XGROUP", "XINFO") and rest:
        what, keys = f"{name} {rest[0].upper()}", rest[1:2] if name[0] == "X" else []
    elif name in ("TIME", "PING", "SCAN", "HELLO", "AUTH", "WAIT", "WAITAOF", "SELECT",
                  "MULTI", "EXEC", "INFO", "KEYS", "FLUSHALL", "FLUSHDB"):
        what, keys = name, []
    else:
        what, keys = name, rest[:1]
    shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
    return f"{what} on {shown}" if shown else what


def error_code(exc: rex.ResponseError) -> str:
    """The error reply's code (``NOGROUP``, ``READONLY``, ...); ``""`` when it has none."""
    status: str | None = getattr(exc, "status_code", None)
    if status:
        return status
    first = str(exc).split(" ", 1)[0]
    return first if _CODE.fullmatch(first) else ""


def translate(exc: BaseException, user: str | None = None) -> BaseException:
    """The streambus error for ``exc`` (anything not from redis-py is returned as is);
    ``user`` is the user the client authenticates as (``None``: the default user)."""
    if isinstance(exc, StreambusError):
        return exc  # translated already (NotPermitted is an OSError: never "unreachable")
    user = user or "default"
    # Before ConnectionError: redis-py raises these as connection errors, but no retry cures
    # a wrong password.
    if isinstance(exc, rex.AuthenticationError | rex.AuthorizationError):
        return _auth_failed(user, str(exc))
    if isinstance(exc, rex.ConnectionError | OSError) and (
            rejected := _certificate_problem(exc)) is not None:
        return rejected
    if isinstance(exc, rex.ResponseError):
        code, message = error_code(exc), _SCRIPT_SUFFIX.sub("", str(exc))
        if code and message.startswith(f"{code} "):  # an error a script returned as text
            message = message[len(code) + 1:]
        command = getattr(exc, _COMMAND_ATTR, "")
        if pipelined := _PIPELINED.fullmatch(message):
            command = command or describe_command(pipelined["command"].split())
            message = pipelined["error"].strip("(),'\"")
        if code in _REFUSED or isinstance(exc, rex.NoPermissionError) or (
                code == "ERR" and message.startswith(_REFUSED_IN_SCRIPT)):
            return _refused(user, command, message)
        if code in _AUTH_FAILED:
            return _auth_failed(user, message)
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


def _certificate_problem(exc: BaseException) -> CertificateRejected | None:
    """A TLS failure about a certificate, found in ``exc``'s chain (redis-py wraps the ``ssl``
    error in a ConnectionError); ``None`` for anything else, which stays retryable."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return CertificateRejected(
                f"TLS: the server's certificate cannot be verified: {seen.verify_message} "
                "(ssl_ca_certs must name the CA that signed it, and the host must match it)")
        if (isinstance(seen, ssl.SSLError) and "CERTIFICATE" in (reason := seen.reason or "")) \
                or (isinstance(seen, ssl.SSLError) and reason.endswith("UNKNOWN_CA")):
            return CertificateRejected(
                f"TLS: the server refused the client certificate ({reason.lower()}): give "
                "ssl_certfile and ssl_keyfile signed by a CA the server trusts")
        seen = seen.__cause__ or seen.__context__
    return None


def _auth_failed(user: str, message: str) -> NotPermitted:
    if message.startswith(_NO_PASSWORD):
        why = "the server requires a password and the URL gives none"
    else:
        why = message.removeprefix("WRONGPASS ").rstrip(".")
    return NotPermitted(f"authentication failed for user {user!r}: {why}")


def _refused(user: str, command: str, message: str) -> NotPermitted:
    for prefix in ("NOPERM ", *(p + ": " for p in _REFUSED_IN_SCRIPT[:1])):
        message = message.removeprefix(prefix)
    doing = f" {command}" if command else " this"
    return NotPermitted(f"not permitted: the server's ACL does not let user {user!r} run"
                        f"{doing} ({message.rstrip('.')})")


@contextlib.contextmanager
def translated(user: str | None = None) -> Iterator[None]:
    """Raise every redis-py error inside the block as its streambus error (``user``: who the
    client authenticates as, for the message of a refusal)."""
    try:
        yield
    except (rex.RedisError, rex.RedisClusterException, OSError) as exc:
        error = translate(exc, user)
        if error is exc:
            raise  # a streambus error already (NotPermitted is an OSError)
        raise error from exc
