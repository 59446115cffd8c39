"""The store: the only module that talks to Redis.

Everything above this module speaks streambus's language (events, ids, outcomes); everything
below it is redis-py. Redis errors are translated into :mod:`streambus.errors` here and nowhere
else. redis-py's own command retries are switched off: a retried ``XADD`` can append twice and a
retried blocking read can strand entries in the PEL (see ``docs/failure-behaviour.md``), so
retrying is decided above the store, where it is known to be safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, cast

import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from streambus.errors import BusUnavailable, DurabilityNotReached, StreambusError
from streambus.keys import SwarmKeys
from streambus.schema import FIELD, stream_id_tuple

log = logging.getLogger(__name__)

_LUA_DIR: Final = Path(__file__).parent / "lua"
Entry = tuple[str, dict[bytes, bytes] | None]
"""A stream entry: its id and its fields (``None`` when the entry was trimmed while pending)."""


class GroupMissing(StreambusError):
    """A consumer group (or its stream) is gone: deleted, or lost in a restart without AOF."""


class _Unblocked(StreambusError):
    """A blocking read was interrupted with ``CLIENT UNBLOCK``."""


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """Translate redis-py exceptions into streambus's own. The only place that does so."""
    try:
        yield
    except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
        raise BusUnavailable(f"Redis unreachable: {exc}") from exc
    except rex.ResponseError as exc:
        raise _translate_response(exc) from exc


_NOT_READY: Final = (rex.BusyLoadingError, rex.ReadOnlyError, rex.TryAgainError,
                     rex.MasterDownError, rex.ClusterDownError)


def _translate_response(exc: rex.ResponseError) -> StreambusError:
    # redis-py strips the error code from the errors it maps to classes (LOADING, OOM, ...),
    # so those are told apart by class; the rest by their code.
    message = str(exc)
    if isinstance(exc, _NOT_READY):
        return BusUnavailable(f"Redis not ready: {message}")
    if isinstance(exc, rex.OutOfMemoryError):
        # Transient by design: TTLs expire and trims run, so callers retry within budgets.
        return BusUnavailable(f"Redis out of memory (maxmemory reached): {message}")
    if message.startswith("NOGROUP"):
        return GroupMissing(message)
    if message.startswith("UNBLOCKED"):
        return _Unblocked(message)
    return StreambusError(f"Redis error: {message}")


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


@dataclass(frozen=True, slots=True)
class GroupRead:
    """One ``XREADGROUP`` to run in a batch: read ``group``'s pending entries or new ones."""

    stream: str
    group: str
    pending: bool


@dataclass(frozen=True, slots=True)
class Receipt:
    """Everything the ``receive`` script needs to acknowledge one delivered signal."""

    keys: SwarmKeys
    coordinator: str
    channel: str
    stream_id: str
    signal_id: str
    ack_event: bytes
    received_event: bytes
    ended_event: bytes
    iteration: int


@dataclass(frozen=True, slots=True)
class Limits:
    """Retention and size settings the scripts apply."""

    state_ttl_s: int = 24 * 3600
    dedupe_ttl_s: int = 24 * 3600
    channel_retention_ms: int = 24 * 3600 * 1000
    events_maxlen: int = 100_000
    heartbeat_retention_ms: int = 3600 * 1000


class Store:
    """A connection to one Redis server, and the handful of operations streambus needs."""

    def __init__(self, url: str, *, limits: Limits, max_connections: int = 32) -> None:
        self.url = url
        self.limits = limits
        self._pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=None,
            socket_timeout=5.0,
            socket_connect_timeout=2.0,
            retry=Retry(NoBackoff(), 0),
        )
        # redis-py's reply types are unions too wide to be useful; replies are converted to
        # our own types right here, so the client is typed as Any on purpose.
        self._redis: Any = aioredis.Redis.from_pool(self._pool)
        self._scripts = _Scripts(self._redis)
        self._closed = False

    def __repr__(self) -> str:
        return f"<Store {self.url_redacted!r}{' closed' if self._closed else ''}>"

    @property
    def url_redacted(self) -> str:
        """The URL with any password replaced, fit for logs and errors."""
        scheme, sep, rest = self.url.partition("://")
        userinfo, at, hostpart = rest.rpartition("@")
        if not at:
            return self.url
        user = userinfo.partition(":")[0]
        return f"{scheme}{sep}{user}:***@{hostpart}"

    async def aclose(self) -> None:
        """Close every connection. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            await self._redis.aclose()
        with contextlib.suppress(Exception):
            await self._pool.aclose()

    def blocking_reader(self, *, block_ms: int) -> BlockingReader:
        """A reader with a connection of its own, for ``XREAD BLOCK``."""
        return BlockingReader(self.url, block_ms=block_ms)

    # -- plain commands ------------------------------------------------------------------------

    async def ping(self) -> None:
        with _translated():
            await self._redis.ping()

    async def time_ms(self) -> int:
        """Server time in ms since the epoch (``TIME``): the one clock streambus trusts."""
        with _translated():
            seconds, micros = await self._redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def server_info(self) -> dict[str, str]:
        with _translated():
            info = await self._redis.info("server")
        return {k: str(v) for k, v in info.items()}

    async def unblock(self, client_id: int) -> bool:
        """Interrupt a client blocked in ``XREAD`` (it returns as if timed out)."""
        with _translated():
            return bool(await self._redis.client_unblock(client_id))

    async def hgetall(self, key: str) -> dict[str, str]:
        with _translated():
            raw = await self._redis.hgetall(key)
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def swarm_snapshot(self, keys: SwarmKeys) -> SwarmSnapshot:
        """Server time, every coordinator's state hash, last beat and retry backlog: two
        round trips, whatever the number of coordinators."""
        with _translated():
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.time()
                pipe.zrange(keys.coordinators, 0, -1)
                pipe.zrange(keys.alive, 0, -1, withscores=True)
                pipe.hgetall(keys.retry_backlog)
                (seconds, micros), ids, beats, backlog = await pipe.execute()
            async with self._redis.pipeline(transaction=False) as pipe:
                for coordinator in ids:
                    pipe.hgetall(keys.state(coordinator.decode()))
                rows = await pipe.execute()
        return SwarmSnapshot(
            now_ms=int(seconds) * 1000 + int(micros) // 1000,
            states=[{k.decode(): v.decode() for k, v in row.items()} for row in rows if row],
            beats={c.decode(): int(score) for c, score in beats},
            backlog={c.decode(): int(n) for c, n in backlog.items()},
        )

    async def ensure_group(self, stream: str, group: str) -> None:
        """Create ``group`` at the start of ``stream`` (and the stream) unless it exists."""
        with _translated():
            try:
                await self._redis.xgroup_create(stream, group, id="0", mkstream=True)
            except rex.ResponseError as exc:
                if not str(exc).startswith("BUSYGROUP"):
                    raise

    async def reset_group(self, stream: str, group: str) -> None:
        """Drop ``group`` (its position and pending entries) and create it again at 0."""
        with _translated():
            await self._redis.xgroup_destroy(stream, group)
        await self.ensure_group(stream, group)

    async def retire_consumer(self, stream: str, group: str, consumer: str) -> bool:
        """Delete ``consumer`` from ``group`` if it holds no pending entries (deleting it
        would drop them); True if it was deleted."""
        with _translated():
            held = await self._redis.xpending_range(stream, group, min="-", max="+", count=1,
                                                    consumername=consumer)
            if held:
                return False
            await self._redis.xgroup_delconsumer(stream, group, consumer)
        return True

    async def ack(self, stream: str, group: str, ids: Sequence[str]) -> None:
        if ids:
            with _translated():
                await self._redis.xack(stream, group, *ids)

    async def acks_snapshot(self, keys: SwarmKeys, signal_id: str) -> tuple[str, dict[str, str]]:
        """The acks stream's last id, then who acknowledged ``signal_id`` (probe first)."""
        with _translated():
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xrevrange(keys.acks, count=1)
                pipe.hgetall(keys.acked(signal_id))
                last, acked = await pipe.execute()
        last_id = last[0][0].decode() if last else "0-0"
        return last_id, {k.decode(): v.decode() for k, v in acked.items()}

    async def coordinator_census(self, keys: SwarmKeys) -> dict[tuple[str, str], int]:
        """How many coordinators the swarm's index lists per ``(state, channel)`` of their
        state hashes: the index, then one pipelined round trip of script calls (counted on
        the server, a chunk of coordinators per call)."""
        with _translated():
            ids = await self._redis.zrange(keys.coordinators, 0, -1)
            states = [keys.state(coordinator.decode()) for coordinator in ids]

            def build(pipe: Any) -> None:
                for chunk in _chunks(states):
                    self._scripts.queue(pipe, "census", keys=chunk, args=[])

            replies = await self._scripts.pipeline(build) if states else []
        counts: dict[tuple[str, str], int] = {}
        for reply in replies:
            if isinstance(reply, BaseException):
                raise _as_streambus(reply)
            for state, channel, n in zip(reply[::3], reply[1::3], reply[2::3], strict=True):
                key = (state.decode(), channel.decode())
                counts[key] = counts.get(key, 0) + int(n)
        return counts

    async def stream_info(self, streams: Sequence[str]) -> dict[str, StreamInfo]:
        """``XLEN`` and ``XINFO GROUPS`` of each stream in one round trip (a missing stream:
        length 0, no groups)."""
        with _translated():
            async with self._redis.pipeline(transaction=False) as pipe:
                for stream in streams:
                    pipe.xlen(stream)
                    pipe.xinfo_groups(stream)
                replies = await pipe.execute(raise_on_error=False)
        out: dict[str, StreamInfo] = {}
        for stream, length, groups in zip(streams, replies[::2], replies[1::2], strict=True):
            if isinstance(groups, rex.ResponseError) and "no such key" in str(groups):
                groups = []
            for reply in (length, groups):
                if isinstance(reply, BaseException):
                    raise _as_streambus(reply)
            out[stream] = StreamInfo(int(length), [
                GroupInfo(g["name"].decode(), int(g["pending"]),
                          None if g.get("lag") is None else int(g["lag"]))
                for g in groups])
        return out

    async def read_range(self, stream: str, start: str = "-", count: int = 1000) -> list[Entry]:
        with _translated():
            raw = await self._redis.xrange(stream, min=start, count=count)
        return _decode_entries(raw)

    # -- scripts ---------------------------------------------------------------------------------

    async def publish(self, keys: SwarmKeys, channel: str, signal_id: str, event: bytes, *,
                      durability: Durability = "none", durability_timeout_ms: int = 1000,
                      ) -> tuple[str, bool]:
        """Append a signal unless its id was published in the last 24 h: ``(stream_id, dup)``.

        ``durability`` "fsync" confirms the write reached the server's append-only file
        (``WAITAOF 1 0``, Redis >= 7.2 / Valkey); "replicated" that a replica has it
        (``WAIT 1``). Both run on the publish's own connection, as they must.
        """
        def build(pipe: Any) -> None:
            self._scripts.queue(
                pipe, "publish", keys=[keys.dedupe(signal_id), keys.channel(channel)],
                args=[event, self.limits.dedupe_ttl_s, self.limits.channel_retention_ms, FIELD])
            if durability == "fsync":
                pipe.execute_command("WAITAOF", 1, 0, durability_timeout_ms)
            elif durability == "replicated":
                pipe.execute_command("WAIT", 1, durability_timeout_ms)

        with _translated():
            replies = await self._scripts.pipeline(build)
        published = replies[0]
        if isinstance(published, BaseException):
            raise _as_streambus(published)
        dup, stream_id = published
        if durability != "none":
            _check_durability(durability, replies[1], stream_id.decode())
        return stream_id.decode(), bool(dup)

    async def begin_wait(
        self, keys: SwarmKeys, coordinator: str, channel: str, timeout_ms: int, iteration: int,
        watches: Sequence[str] = (),
    ) -> WaitStart:
        """Create the coordinator's group (at 0) and record the wait, keeping an open deadline."""
        with _translated():
            reply = await self._scripts.call(
                "begin_wait", keys=[keys.state(coordinator), keys.channel(channel), keys.events,
                                    keys.coordinators],
                args=[coordinator, channel, timeout_ms, self.limits.state_ttl_s, iteration, FIELD,
                      self.limits.events_maxlen, ",".join(watches)],
            )
        now, deadline, iteration, mode = (int(x) for x in reply[:4])
        received = reply[4].decode() if mode == 2 else ""
        started = int(reply[5]) if len(reply) > 5 else (0 if mode else now)
        return WaitStart(now, deadline, iteration, mode == 1, received, started)

    async def entry(self, stream: str, stream_id: str) -> Entry | None:
        """One entry by id, or ``None`` if it is gone (trimmed)."""
        with _translated():
            raw = await self._redis.xrange(stream, min=stream_id, max=stream_id, count=1)
        entries = _decode_entries(raw)
        return entries[0] if entries else None

    async def ack_id(self, keys: SwarmKeys, signal_id: str, coordinator: str) -> str:
        """The id of ``coordinator``'s Ack of ``signal_id`` (``""`` if it has none)."""
        with _translated():
            raw = await self._redis.hget(keys.acked(signal_id), coordinator)
        return raw.decode() if raw else ""

    async def end_wait(
        self,
        keys: SwarmKeys,
        coordinator: str,
        channel: str,
        iteration: int,
        state: str,
        ended_event: bytes,
    ) -> bool:
        """Record how a wait ended, if it is still the open wait. False: already ended."""
        with _translated():
            changed = await self._scripts.call(
                "end_wait", keys=[keys.state(coordinator), keys.events, keys.coordinators],
                args=[channel, iteration, state, ended_event, FIELD, self.limits.state_ttl_s,
                      self.limits.events_maxlen],
            )
        return bool(changed)

    async def receive_many(self, receipts: Sequence[Receipt]) -> list[str | BaseException]:
        """Acknowledge delivered signals (one swarm) in one round trip; return each Ack's id."""
        if not receipts:
            return []
        keys = receipts[0].keys
        if any(r.keys != keys for r in receipts):
            raise ValueError("receive_many takes the receipts of one swarm")
        def call_args(chunk: Sequence[Receipt]) -> dict[str, Any]:
            return {
                "keys": [keys.acks, keys.events, keys.coordinators, *(
                    k for r in chunk for k in (
                        keys.channel(r.channel), keys.acked(r.signal_id),
                        keys.state(r.coordinator)))],
                "args": [FIELD, self.limits.state_ttl_s, self.limits.events_maxlen,
                         self.limits.dedupe_ttl_s, *(
                             a for r in chunk for a in (
                                 r.coordinator, r.stream_id, r.signal_id, r.ack_event,
                                 r.received_event, r.ended_event, r.iteration))],
            }

        chunks = _chunks(receipts)
        with _translated():
            if len(chunks) == 1:  # the common case, without a pipeline's overhead
                try:
                    replies: list[Any] = [await self._scripts.call("receive",
                                                                  **call_args(chunks[0]))]
                except rex.ResponseError as exc:
                    replies = [exc]
            else:
                def build(pipe: Any) -> None:
                    for chunk in chunks:
                        self._scripts.queue(pipe, "receive", **call_args(chunk))

                replies = await self._scripts.pipeline(build)
        out: list[str | BaseException] = []
        for chunk, reply in zip(chunks, replies, strict=True):
            if isinstance(reply, BaseException):
                out.extend([_as_streambus(reply)] * len(chunk))
            else:
                out.extend(ack_id.decode() for ack_id in reply)
        return out

    async def read_groups(
        self, reads: Sequence[GroupRead], probes: Sequence[str] = ()
    ) -> tuple[list[str], list[list[Entry] | BaseException]]:
        """One round trip: the last id of each ``probes`` stream, then each group read.

        The probes run first, so an entry appended after a probe is either returned by a group
        read or newer than the probed id; a blocking ``XREAD`` from the probed id cannot miss it.
        The reads run as one script call per chunk: each waiter's ``XREADGROUP ... COUNT 1``,
        delivering into its PEL and acknowledging nothing.
        """
        def build(pipe: Any) -> None:
            for stream in probes:
                pipe.xrevrange(stream, count=1)
            for chunk in _chunks(reads):
                self._scripts.queue(
                    pipe, "deliver", keys=[read.stream for read in chunk],
                    args=[a for read in chunk
                          for a in (read.group, "0" if read.pending else ">")])

        with _translated():
            replies = await self._scripts.pipeline(build)
        last_ids = []
        for reply in replies[: len(probes)]:
            if isinstance(reply, Exception):
                raise _as_streambus(reply)
            last_ids.append(reply[0][0].decode() if reply else "0-0")
        reads_out: list[list[Entry] | BaseException] = []
        for chunk, reply in zip(_chunks(reads), replies[len(probes):], strict=True):
            if isinstance(reply, BaseException):
                reads_out.extend([_as_streambus(reply)] * len(chunk))
            else:
                reads_out.extend(_scripted_read(one) for one in reply)
        return last_ids, reads_out

    async def beat(self, keys: SwarmKeys, coordinator: str, event: bytes, *,
                   failures: int = 0) -> int:
        """Record one heartbeat; return its server time (ms). ``failures``: beats of this
        coordinator that failed since its last successful one, added to the swarm's
        ``heartbeat_failures`` counter (a beat that fails cannot count itself)."""
        with _translated():
            now = await self._scripts.call(
                "beat", keys=[keys.heartbeats, keys.alive, keys.counters],
                args=[coordinator, event, self.limits.heartbeat_retention_ms, FIELD, failures],
            )
        return int(now)

    async def last_beats(self, keys: SwarmKeys, peers: Sequence[str]) -> tuple[
        int, dict[str, int | None]
    ]:
        """Server now (ms) and each peer's last beat (ms, ``None`` if it never beat)."""
        with _translated():
            reply = await self._scripts.call("last_beats", keys=[keys.alive], args=list(peers))
        beats = {peer: (int(ms) if int(ms) >= 0 else None)
                 for peer, ms in zip(peers, reply[1:], strict=True)}
        return int(reply[0]), beats

    async def record_progress(self, keys: SwarmKeys, task: str, item: str, event: bytes
                              ) -> tuple[bool, str]:
        """Record an item of ``task`` done, once: ``(recorded_now, entry id)``."""
        with _translated():
            fresh, entry_id = await self._scripts.call(
                "progress", keys=[keys.progress(task), keys.progress_done(task)],
                args=[item, event, FIELD, self.limits.state_ttl_s])
        return bool(fresh), entry_id.decode()

    async def loop_transition(self, keys: SwarmKeys, field: str, expected: str, new: str,
                              event: bytes) -> tuple[bool, str]:
        """Compare-and-set one loop state and append its event: ``(done, id or current)``."""
        with _translated():
            done, value = await self._scripts.call(
                "loop_transition", keys=[keys.loop_events, keys.loop_state],
                args=[field, expected, new, event, FIELD, self.limits.state_ttl_s * 7])
        return bool(done), value.decode()

    async def scan(self, pattern: str, *, type_: str | None = None) -> list[str]:
        """Every key matching ``pattern`` (``SCAN``, never ``KEYS``)."""
        with _translated():
            return [key.decode() async for key in self._redis.scan_iter(
                match=pattern, count=1000, _type=type_)]

    async def stale_candidates(self, keys: SwarmKeys, stale_after_ms: int) -> list[str]:
        """Coordinators whose last state change or last beat is older than the threshold."""
        now = await self.time_ms()
        cutoff = now - stale_after_ms
        with _translated():
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zrangebyscore(keys.coordinators, "-inf", f"({cutoff}")
                pipe.zrangebyscore(keys.alive, "-inf", f"({cutoff}")
                by_state, by_beat = await pipe.execute()
        return sorted({c.decode() for c in (*by_state, *by_beat)})

    async def remove_stale(self, keys: SwarmKeys, channels: Sequence[str],
                           candidates: Sequence[str], stale_after_ms: int, *, dry_run: bool,
                           ) -> tuple[list[str], int, int]:
        """Remove those ``candidates`` still stale at execution time (one atomic script per
        chunk): ``(removed, consumer groups destroyed, retry streams removed)``."""
        removed: list[str] = []
        groups = retries = 0
        for chunk in _chunks(candidates):
            with _translated():
                reply = await self._scripts.call(
                    "cleanup",
                    keys=[keys.coordinators, keys.alive, keys.reported_dead, keys.retry_backlog,
                          *channels, *(k for c in chunk for k in (keys.state(c),
                                                                  keys.retries(c)))],
                    args=[stale_after_ms, len(channels), int(dry_run), *chunk])
            split = reply.index(b"|")
            removed.extend(c.decode() for c in reply[:split])
            groups += int(reply[split + 1])
            retries += int(reply[split + 2])
        return removed, groups, retries

    async def report_dead(self, keys: SwarmKeys, dead_after_ms: int, limit: int = 1000
                          ) -> list[str]:
        """Append ``CoordinatorDead`` for each newly lapsed coordinator; return their ids."""
        with _translated():
            reply = await self._scripts.call(
                "report_dead", keys=[keys.alive, keys.reported_dead, keys.events],
                args=[dead_after_ms, FIELD, self.limits.events_maxlen, limit])
        return [c.decode() for c in reply]

    async def request_retry(self, keys: SwarmKeys, coordinator: str, request_id: str,
                            event: bytes, backlog_limit: int) -> tuple[int, str]:
        """Append a retry request: ``(0, id)`` new, ``(1, id)`` duplicate, ``(2, backlog)`` full."""
        with _translated():
            status, value = await self._scripts.call(
                "retry_request", keys=[keys.retry_dedupe(request_id), keys.retries(coordinator),
                      keys.retry_backlog],
                args=[coordinator, event, backlog_limit, self.limits.dedupe_ttl_s, FIELD],
            )
        return int(status), value.decode() if isinstance(value, bytes) else str(value)

    async def retries_done(self, keys: SwarmKeys, coordinator: str, ids: Sequence[str]) -> int:
        """Acknowledge processed retry requests and shrink the backlog by as many."""
        if not ids:
            return 0
        with _translated():
            return int(await self._scripts.call(
                "retry_done", keys=[keys.retries(coordinator), keys.retry_backlog],
                args=[coordinator, *ids]))

    async def delivery_counts(self, stream: str, group: str, consumer: str,
                              ids: Sequence[str]) -> dict[str, int]:
        """How many times each pending entry was delivered (``XPENDING`` extended form)."""
        if not ids:
            return {}
        with _translated():
            rows = await self._redis.xpending_range(
                stream, group, min=min(ids, key=stream_id_tuple),
                max=max(ids, key=stream_id_tuple), count=len(ids) * 2, consumername=consumer)
        return {row["message_id"].decode(): int(row["times_delivered"]) for row in rows}

    async def autoclaim(self, stream: str, group: str, consumer: str, min_idle_ms: int,
                        count: int = 100) -> list[Entry]:
        """Move entries idle past ``min_idle_ms`` on any consumer of ``group`` to ``consumer``."""
        claimed: list[Entry] = []
        cursor = "0-0"
        with _translated():
            while True:
                reply = await self._redis.xautoclaim(stream, group, consumer, min_idle_ms,
                                                     start_id=cursor, count=count)
                cursor = reply[0].decode()
                claimed.extend(_decode_entries(reply[1]))
                if cursor == "0-0":
                    return claimed

    async def dead_letter(
        self, keys: SwarmKeys, source: str, group: str, entry: Entry, reason: str, *,
        ack: bool = True,
    ) -> None:
        """Move a poison entry aside: copy it with the reason, and acknowledge it at the source
        (unless ``ack`` is false: the caller acknowledges it with other bookkeeping)."""
        entry_id, fields = entry
        record: dict[str | bytes, str | bytes] = {
            "reason": reason, "source": source, "source_id": entry_id, "group": group,
        }
        for name, value in (fields or {}).items():
            record[b"orig." + name] = value
        with _translated():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xadd(keys.dead_letters, cast(Any, record), maxlen=self.limits.events_maxlen,
                          approximate=True)
                pipe.hincrby(keys.counters, "dead_letters", 1)
                if ack:
                    pipe.xack(source, group, entry_id)
                await pipe.execute()


Durability = Literal["none", "fsync", "replicated"]


def _check_durability(level: Durability, reply: Any, stream_id: str) -> None:
    if isinstance(reply, rex.ResponseError):
        raise DurabilityNotReached(
            f"signal {stream_id} was appended, but durability {level!r} is unavailable: {reply}"
        )
    if isinstance(reply, BaseException):
        raise _as_streambus(reply)
    confirmed = int(reply[0]) if level == "fsync" else int(reply)
    if confirmed < 1:
        raise DurabilityNotReached(
            f"signal {stream_id} was appended, but not confirmed {level} in time"
        )


def _as_streambus(exc: BaseException) -> BaseException:
    if isinstance(exc, rex.ResponseError):
        return _translate_response(exc)
    if isinstance(exc, rex.ConnectionError | rex.TimeoutError):
        return BusUnavailable(f"Redis unreachable: {exc}")
    return exc


_T = TypeVar("_T")
_CHUNK: Final = 256
"""Waiters per script call: bounds how long one call holds the server (a few ms)."""


def _chunks(items: Sequence[_T]) -> list[Sequence[_T]]:
    return [items[i:i + _CHUNK] for i in range(0, len(items), _CHUNK)]


def _scripted_read(reply: Any) -> list[Entry] | BaseException:
    """One read of the deliver script: ``[]``, ``[[stream, entries]]`` or ``['ERR', message]``."""
    if reply and reply[0] == b"ERR":
        return _translate_response(rex.ResponseError(reply[1].decode()))
    if not reply:
        return []
    return [(entry_id.decode(), _field_map(flat)) for entry_id, flat in reply[0][1]]


def _field_map(flat: Any) -> dict[bytes, bytes] | None:
    if not flat:
        return None
    return dict(zip(flat[::2], flat[1::2], strict=True))


class _Scripts:
    """The Lua scripts, run by ``EVALSHA`` and loaded when the server lacks them (``NOSCRIPT``,
    e.g. after a restart).

    redis-py's ``Script`` objects are not used in pipelines: there they send ``SCRIPT EXISTS``
    before every pipeline, a hidden extra round trip on the signal path.
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        # Every script in streambus/lua/, by file name: adding a script is adding its file.
        self._source = {path.stem: path.read_text() for path in sorted(_LUA_DIR.glob("*.lua"))}
        self._sha = {name: hashlib.sha1(text.encode()).hexdigest()
                     for name, text in self._source.items()}

    async def call(self, name: str, *, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run one script (callers translate errors)."""
        try:
            return await self._client.evalsha(self._sha[name], len(keys), *keys, *args)
        except rex.NoScriptError:
            await self._client.script_load(self._source[name])
            return await self._client.evalsha(self._sha[name], len(keys), *keys, *args)

    def queue(self, pipe: Any, name: str, *, keys: Sequence[str], args: Sequence[Any]) -> None:
        """Add one script call to a pipeline being built for :meth:`pipeline`."""
        pipe.evalsha(self._sha[name], len(keys), *keys, *args)

    async def pipeline(self, build: Callable[[Any], None]) -> list[Any]:
        """Run the commands ``build`` queues, in one round trip; replies or exceptions.

        A script missing on the server did not run at all (``NOSCRIPT`` comes before
        execution), so loading the scripts and running the pipeline once more is safe.
        """
        for attempt in range(2):
            async with self._client.pipeline(transaction=False) as pipe:
                build(pipe)
                replies: list[Any] = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, rex.NoScriptError) for r in replies):
                for text in self._source.values():
                    await self._client.script_load(text)
                continue
            return replies
        raise AssertionError("unreachable")  # pragma: no cover


class BlockingReader:
    """One dedicated connection for ``XREAD BLOCK``, interruptible with ``CLIENT UNBLOCK``.

    ``BLOCK`` stays well below the socket timeout: otherwise the client would time out first
    and drop a connection the server may still deliver on.
    """

    def __init__(self, url: str, *, block_ms: int) -> None:
        self.block_ms = block_ms
        self._redis: Any = aioredis.Redis.from_url(
            url,
            single_connection_client=True,
            socket_timeout=block_ms / 1000 + 1.0,
            socket_connect_timeout=2.0,
            retry=Retry(NoBackoff(), 0),
        )
        self.client_id: int | None = None

    async def connect(self) -> int:
        """(Re)connect and learn this connection's client id, for ``CLIENT UNBLOCK``."""
        with _translated():
            self.client_id = int(await self._redis.client_id())
        return self.client_id

    async def read(self, cursors: Mapping[str, str]) -> dict[str, list[Entry]]:
        """Block until any stream has entries after its cursor, or the block time passes."""
        try:
            with _translated():
                reply = await self._redis.xread(dict(cursors), block=self.block_ms)
        except _Unblocked:
            return {}
        except BusUnavailable:
            self.client_id = None
            raise
        out: dict[str, list[Entry]] = {}
        for stream, entries in reply or ():
            out[stream.decode()] = _decode_entries(entries)
        return out

    async def read_group(self, stream: str, group: str, consumer: str, *, pending: bool,
                         count: int) -> list[Entry]:
        """``XREADGROUP``: the consumer's pending entries, or new ones blocking up to BLOCK."""
        try:
            with _translated():
                reply = await self._redis.xreadgroup(
                    group, consumer, {stream: "0" if pending else ">"}, count=count,
                    block=None if pending else self.block_ms)
        except BusUnavailable:
            self.client_id = None
            raise
        if not reply:
            return []
        return [(entry_id.decode(), fields) for entry_id, fields in reply[0][1]]

    async def read_groups(self, streams: Sequence[str], group: str, consumer: str, *,
                          pending: bool, count: int, block: bool) -> dict[str, list[Entry]]:
        """``XREADGROUP`` over several streams of one slot: pending entries or new ones."""
        if not streams:
            return {}
        try:
            with _translated():
                reply = await self._redis.xreadgroup(
                    group, consumer, dict.fromkeys(streams, "0" if pending else ">"),
                    count=count, block=self.block_ms if block and not pending else None)
        except BusUnavailable:
            self.client_id = None
            raise
        return {name.decode(): [(i.decode(), f) for i, f in entries]
                for name, entries in reply or ()}

    async def aclose(self) -> None:
        """Close the connection. Safe to call twice."""
        with contextlib.suppress(Exception):
            await self._redis.aclose()


@contextlib.asynccontextmanager
async def open_store(url: str, *, limits: Limits | None = None) -> AsyncIterator[Store]:
    store = Store(url, limits=limits or Limits())
    try:
        yield store
    finally:
        await store.aclose()
