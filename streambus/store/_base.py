"""Shared parts of the store: error translation, reply types, the script runner."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple, TypeVar

import redis.exceptions as rex

from streambus.errors import BusUnavailable, DurabilityNotReached
from streambus.keys import SwarmKeys
from streambus.store._errors import name_script, remember_command, translate, translated
from streambus.store._nodes import Nodes

log = logging.getLogger("streambus.store")

_LUA_DIR: Final = Path(__file__).parent.parent / "lua"
Entry = tuple[str, dict[bytes, bytes] | None]
"""A stream entry: its id and its fields (``None`` when the entry was trimmed while pending)."""


def _decode_entries(raw: Any) -> list[Entry]:
    return [(entry_id.decode(), fields) for entry_id, fields in raw or ()]


@dataclass(frozen=True, slots=True)
class WaitStart:
    """What ``begin_wait`` recorded: server now, the deadline and iteration of the wait."""

    now_ms: int
    deadline_ms: int
    iteration: int
    resumed: bool
    received_stream_id: str = ""
    """Set when this iteration already received its signal (the entry's id)."""
    started_ms: int = 0
    """When the wait began (server ms); a resumed wait keeps its original start."""
    withdrawn: bool = False
    """The wait was ended by its token before this ran: nothing was started."""


@dataclass(frozen=True, slots=True)
class SwarmSnapshot:
    """The raw material of the blocking view, read together."""

    now_ms: int
    states: list[dict[str, str]]
    beats: dict[str, int]
    backlog: dict[str, int]


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """One consumer group of a stream, as ``XINFO GROUPS`` reports it."""

    name: str
    pending: int
    """Entries delivered to the group's consumers and not acknowledged yet."""
    lag: int | None
    """Entries not delivered to the group yet (``None`` when the server cannot tell)."""


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """A stream's length and its consumer groups."""

    length: int
    groups: list[GroupInfo]


class GroupRead(NamedTuple):
    """One ``XREADGROUP`` to run in a batch: read ``group``'s pending entries or new ones.

    (A named tuple, as :class:`Receipt`: a fan-out builds one per waiter on every wake, and a
    tuple is built several times faster than a frozen dataclass.)"""

    stream: str
    group: str
    pending: bool


class Receipt(NamedTuple):
    """Everything the ``receive`` script needs to acknowledge one delivered signal (it builds
    the Ack and BlockingEnded events from these)."""

    keys: SwarmKeys
    coordinator: str
    channel: str
    stream_id: str
    signal_id: str
    iteration: int
    started_ms: int
    key_id: str = ""
    """The key that signed the Ack (``streambus.signing``); ``""`` for an unsigned Ack."""
    sig: str = ""


@dataclass(frozen=True, slots=True)
class Limits:
    """Retention and size settings the scripts apply."""

    state_ttl_s: int = 24 * 3600
    dedupe_ttl_s: int = 24 * 3600
    channel_retention_ms: int = 24 * 3600 * 1000
    events_maxlen: int = 100_000
    heartbeat_retention_ms: int = 5 * 60 * 1000
    """Beat history kept in the stream; liveness itself reads the ``alive`` index."""


Durability = Literal["none", "fsync", "replicated"]


def _check_durability(level: Durability, reply: Any, stream_id: str, user: str | None
                      ) -> None:
    if isinstance(reply, rex.ResponseError):
        raise DurabilityNotReached(
            f"signal {stream_id} was appended, but durability {level!r} is unavailable: {reply}"
        )
    if isinstance(reply, BaseException):
        raise translate(reply, user)
    confirmed = int(reply[0]) if level == "fsync" else int(reply)
    if confirmed < 1:
        raise DurabilityNotReached(
            f"signal {stream_id} was appended, but not confirmed {level} in time"
        )


_T = TypeVar("_T")
_CHUNK: Final = 256
"""Waiters per script call: bounds how long one call holds the server (a few ms)."""


def _chunks(items: Sequence[_T]) -> list[Sequence[_T]]:
    return [items[i:i + _CHUNK] for i in range(0, len(items), _CHUNK)]


def _scripted_reads(replies: Any, user: str | None) -> list[list[Entry] | BaseException]:
    """The reads of one deliver script call: per read ``[]``, ``['E', id, fields]``,
    ``['S', id]`` (the fields of an earlier read of the same entry) or ``['ERR', message]``.

    Reads of the same entry share one field map (entries never change; nobody mutates it).
    """
    out: list[list[Entry] | BaseException] = []
    bodies: dict[bytes, dict[bytes, bytes] | None] = {}
    for reply in replies:
        if not reply:
            out.append([])
        elif reply[0] == b"S":
            out.append([(reply[1].decode(), bodies[reply[1]])])
        elif reply[0] == b"E":
            fields = bodies[reply[1]] = _field_map(reply[2])
            out.append([(reply[1].decode(), fields)])
        else:
            out.append(translate(rex.ResponseError(reply[1].decode()), user))
    return out


def _field_map(flat: Any) -> dict[bytes, bytes] | None:
    if not flat or not isinstance(flat, list):  # 0 or nil: deleted while pending
        return None
    return dict(zip(flat[::2], flat[1::2], strict=True))


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script run by ``EVALSHA``. The core's live in ``streambus/lua/``; an application
    on the bus brings its own (see :meth:`streambus.Bus.run_script`)."""

    name: str
    source: str

    @classmethod
    def from_file(cls, path: Path) -> Script:
        return cls(path.stem, path.read_text())

    @property
    def sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()

    @property
    def read_only(self) -> bool:
        """Declared ``#!lua flags=no-writes``: run as ``EVALSHA_RO``, which a read-only ACL
        user may run on keys it can only read (``EVALSHA`` needs write permission on every
        declared key)."""
        first = self.source.partition("\n")[0]
        return first.startswith("#!lua") and "no-writes" in first


class _Scripts:
    """The scripts, run by ``EVALSHA`` and loaded when the server lacks them (``NOSCRIPT``,
    e.g. after a restart, or on a newly promoted replica).

    redis-py's ``Script`` objects are not used in pipelines: there they send ``SCRIPT EXISTS``
    before every pipeline, a hidden extra round trip on the signal path.
    """

    def __init__(self) -> None:
        # Every script in streambus/lua/, by file name: adding a script is adding its file.
        self._known: dict[str, Script] = {
            path.stem: Script.from_file(path) for path in sorted(_LUA_DIR.glob("*.lua"))}
        self._sha = {name: script.sha for name, script in self._known.items()}
        self._read_only = {script.sha for script in self._known.values() if script.read_only}
        for name, sha in self._sha.items():
            name_script(sha, name)

    def _script(self, script: str | Script) -> tuple[str, str]:
        if isinstance(script, Script):
            if script.name not in self._known:
                self._known[script.name] = script
                self._sha[script.name] = script.sha
                if script.read_only:
                    self._read_only.add(script.sha)
                name_script(script.sha, script.name)
            return script.sha, script.source
        return self._sha[script], self._known[script].source

    async def call(self, client: Any, script: str | Script, *, keys: Sequence[str],
                   args: Sequence[Any]) -> Any:
        """Run one script (a core script by name, or an application's ``Script``) through
        ``client``; callers translate errors."""
        sha, source = self._script(script)
        run = client.evalsha_ro if sha in self._read_only else client.evalsha
        try:
            return await run(sha, len(keys), *keys, *args)
        except rex.NoScriptError:  # a restarted server, or a newly promoted replica
            await client.script_load(source)
            return await run(sha, len(keys), *keys, *args)

    def queue(self, pipe: Any, name: str, *, keys: Sequence[str], args: Sequence[Any]) -> None:
        """Add one script call to a pipeline being built for :meth:`pipeline`."""
        sha = self._sha[name]
        run = pipe.evalsha_ro if sha in self._read_only else pipe.evalsha
        run(sha, len(keys), *keys, *args)

    async def pipeline(self, client: Any, build: Callable[[Any], None]) -> list[Any]:
        """Run the commands ``build`` queues, in one round trip; replies or exceptions.

        A script missing on the server did not run at all (``NOSCRIPT`` comes before
        execution), so loading the scripts and running the pipeline once more is safe.
        """
        for attempt in range(2):
            async with client.pipeline(transaction=False) as pipe:
                build(pipe)
                sent = [args for args, _options in pipe.command_stack]
                replies: list[Any] = await pipe.execute(raise_on_error=False)
            for args, reply in zip(sent, replies, strict=True):
                if isinstance(reply, rex.ResponseError):
                    remember_command(reply, args)
            if attempt == 0 and any(isinstance(r, rex.NoScriptError) for r in replies):
                for script in list(self._known.values()):
                    await client.script_load(script.source)
                continue
            return replies
        raise AssertionError("unreachable")  # pragma: no cover


class _StoreBase:
    """What the operation mixins share: the nodes, the scripts and the limits."""

    _nodes: Nodes
    _scripts: _Scripts
    limits: Limits

    @property
    def _user(self) -> str | None:
        """Who the store authenticates as (``None``: the default user), for refusals."""
        return self._nodes.endpoint.username

    @contextlib.asynccontextmanager
    async def _guarded(self) -> AsyncIterator[None]:
        """Translate errors; after one that may mean the topology changed (anything
        :class:`BusUnavailable`), resolve it again before the next command."""
        try:
            with translated(self._user):
                yield
        except BusUnavailable:
            self._nodes.stale()
            raise

    @contextlib.asynccontextmanager
    async def _on(self, route: str) -> AsyncIterator[Any]:
        """The client of the master serving the key ``route`` (any key of the swarm: they
        share one slot), with errors translated.

        redis-py's reply types are unions too wide to be useful; replies are converted to our
        own types in the store, so the client is typed as Any on purpose.
        """
        async with self._guarded():
            await self._nodes.fresh()
            yield self._nodes.client(route)

    async def _masters(self) -> list[Any]:
        async with self._guarded():
            await self._nodes.fresh()
            return self._nodes.masters()

    async def time_ms(self, route: str = "") -> int:
        """Server time in ms since the epoch (``TIME``): the one clock streambus trusts. On a
        cluster, the clock of the master serving ``route``."""
        async with self._on(route) as redis:
            seconds, micros = await redis.time()
        return int(seconds) * 1000 + int(micros) // 1000
