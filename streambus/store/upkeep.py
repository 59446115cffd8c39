"""Groups, liveness, retries, progress, the loop, cleanup and census."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, cast

from streambus.keys import SwarmKeys
from streambus.schema import FIELD, stream_id_tuple
from streambus.store._base import (
    Entry,
    GroupInfo,
    StreamInfo,
    _chunks,
    _decode_entries,
    _StoreBase,
)
from streambus.store._errors import GroupExists, KeyMissing, translate


class UpkeepOps(_StoreBase):
    """Groups, liveness, retries, progress, the loop, cleanup and census."""

    async def ensure_group(self, stream: str, group: str) -> None:
        """Create ``group`` at the start of ``stream`` (and the stream) unless it exists."""
        with contextlib.suppress(GroupExists):
            async with self._on(stream) as redis:
                await redis.xgroup_create(stream, group, id="0", mkstream=True)

    async def reset_group(self, stream: str, group: str) -> None:
        """Drop ``group`` (its position and pending entries) and create it again at 0."""
        async with self._on(stream) as redis:
            await redis.xgroup_destroy(stream, group)
        await self.ensure_group(stream, group)

    async def retire_consumer(self, stream: str, group: str, consumer: str) -> bool:
        """Delete ``consumer`` from ``group`` if it holds no pending entries (deleting it
        would drop them); True if it was deleted."""
        async with self._on(stream) as redis:
            held = await redis.xpending_range(stream, group, min="-", max="+", count=1,
                                                    consumername=consumer)
            if held:
                return False
            await redis.xgroup_delconsumer(stream, group, consumer)
        return True

    async def ack(self, stream: str, group: str, ids: Sequence[str]) -> None:
        if ids:
            async with self._on(stream) as redis:
                await redis.xack(stream, group, *ids)

    async def coordinator_census(self, keys: SwarmKeys) -> dict[tuple[str, str], int]:
        """How many coordinators the swarm's index lists per ``(state, channel)`` of their
        state hashes: the index, then one pipelined round trip of script calls (counted on
        the server, a chunk of coordinators per call)."""
        async with self._on(keys.prefix) as redis:
            ids = await redis.zrange(keys.coordinators, 0, -1)
            states = [keys.state(coordinator.decode()) for coordinator in ids]

            def build(pipe: Any) -> None:
                for chunk in _chunks(states):
                    self._scripts.queue(pipe, "census", keys=chunk, args=[])

            replies = await self._scripts.pipeline(redis, build) if states else []
        counts: dict[tuple[str, str], int] = {}
        for reply in replies:
            if isinstance(reply, BaseException):
                raise translate(reply, self._user)
            for state, channel, n in zip(reply[::3], reply[1::3], reply[2::3], strict=True):
                key = (state.decode(), channel.decode())
                counts[key] = counts.get(key, 0) + int(n)
        return counts

    async def stream_info(self, streams: Sequence[str]) -> dict[str, StreamInfo]:
        """``XLEN`` and ``XINFO GROUPS`` of each stream (of one swarm) in one round trip (a
        missing stream: length 0, no groups)."""
        if not streams:
            return {}
        async with self._on(streams[0]) as redis, redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xlen(stream)
                pipe.xinfo_groups(stream)
            replies = await pipe.execute(raise_on_error=False)
        out: dict[str, StreamInfo] = {}
        for stream, length, groups in zip(streams, replies[::2], replies[1::2], strict=True):
            if isinstance(groups, BaseException) and isinstance(translate(groups), KeyMissing):
                groups = []
            for reply in (length, groups):
                if isinstance(reply, BaseException):
                    raise translate(reply, self._user)
            out[stream] = StreamInfo(int(length), [
                GroupInfo(g["name"].decode(), int(g["pending"]),
                          None if g.get("lag") is None else int(g["lag"]))
                for g in groups])
        return out

    async def beat(self, keys: SwarmKeys, coordinator: str, event: bytes, *,
                   failures: int = 0) -> int:
        """Record one heartbeat; return its server time (ms). ``failures``: beats of this
        coordinator that failed since its last successful one, added to the swarm's
        ``heartbeat_failures`` counter (a beat that fails cannot count itself)."""
        return await self.beat_many(keys, [(coordinator, event, failures)])

    async def beat_many(self, keys: SwarmKeys, beats: Sequence[tuple[str, bytes, int]]) -> int:
        """Record the heartbeats ``(coordinator, event, failures)`` of one swarm in one call."""
        async with self._on(keys.prefix) as redis:
            now = await self._scripts.call(
                redis, "beat", keys=[keys.heartbeats, keys.alive, keys.counters],
                args=[self.limits.heartbeat_retention_ms, FIELD,
                      *(a for beat in beats for a in beat)],
            )
        return int(now)

    async def last_beats(self, keys: SwarmKeys, peers: Sequence[str]) -> tuple[
        int, dict[str, int | None]
    ]:
        """Server now (ms) and each peer's last beat (ms, ``None`` if it never beat)."""
        async with self._on(keys.prefix) as redis:
            reply = await self._scripts.call(redis, "last_beats",
            keys=[keys.alive], args=list(peers))
        beats = {peer: (int(ms) if int(ms) >= 0 else None)
                 for peer, ms in zip(peers, reply[1:], strict=True)}
        return int(reply[0]), beats

    async def record_progress(self, keys: SwarmKeys, task: str, item: str, event: bytes
                              ) -> tuple[bool, str]:
        """Record an item of ``task`` done, once: ``(recorded_now, entry id)``."""
        async with self._on(keys.prefix) as redis:
            fresh, entry_id = await self._scripts.call(
                redis, "progress", keys=[keys.progress(task), keys.progress_done(task)],
                args=[item, event, FIELD, self.limits.state_ttl_s])
        return bool(fresh), entry_id.decode()

    async def scan(self, pattern: str, *, type_: str | None = None) -> list[str]:
        """Every key matching ``pattern`` (``SCAN``, never ``KEYS``), on every master."""
        found: list[str] = []
        for redis in await self._masters():
            async with self._guarded():
                found += [key.decode() async for key in redis.scan_iter(
                    match=pattern, count=1000, _type=type_)]
        return sorted(set(found))

    async def stale_candidates(self, keys: SwarmKeys, stale_after_ms: int) -> list[str]:
        """Coordinators whose last state change or last beat is older than the threshold."""
        now = await self.time_ms(keys.prefix)
        cutoff = now - stale_after_ms
        async with self._on(keys.prefix) as redis, redis.pipeline(transaction=False) as pipe:
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
            async with self._on(keys.prefix) as redis:
                reply = await self._scripts.call(
                redis, "cleanup",
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
        async with self._on(keys.prefix) as redis:
            reply = await self._scripts.call(
                redis, "report_dead", keys=[keys.alive, keys.reported_dead, keys.events],
                args=[dead_after_ms, FIELD, self.limits.events_maxlen, limit])
        return [c.decode() for c in reply]

    async def lease(self, keys: SwarmKeys, job: str, holder: str, ttl_ms: int, *,
                    release: bool = False) -> tuple[bool, str, int]:
        """Take or renew (or release) the lease of ``job``: (held, its holder, time left ms)."""
        async with self._on(keys.prefix) as redis:
            held, who, left = await self._scripts.call(
                redis, "lease", keys=[keys.lease(job)],
                args=[holder, ttl_ms, "release" if release else "hold"])
        return bool(held), who.decode() if isinstance(who, bytes) else str(who), int(left)

    async def request_retry(self, keys: SwarmKeys, coordinator: str, request_id: str,
                            event: bytes, backlog_limit: int) -> tuple[int, str]:
        """Append a retry request: ``(0, id)`` new, ``(1, id)`` duplicate, ``(2, backlog)`` full."""
        async with self._on(keys.prefix) as redis:
            status, value = await self._scripts.call(
                redis, "retry_request",
                keys=[keys.retry_dedupe(request_id), keys.retries(coordinator),
                      keys.retry_backlog],
                args=[coordinator, event, backlog_limit, self.limits.dedupe_ttl_s, FIELD],
            )
        return int(status), value.decode() if isinstance(value, bytes) else str(value)

    async def retries_done(self, keys: SwarmKeys, coordinator: str, ids: Sequence[str]) -> int:
        """Acknowledge processed retry requests and shrink the backlog by as many."""
        if not ids:
            return 0
        async with self._on(keys.prefix) as redis:
            return int(await self._scripts.call(
                redis, "retry_done", keys=[keys.retries(coordinator), keys.retry_backlog],
                args=[coordinator, *ids]))

    async def delivery_counts(self, stream: str, group: str, consumer: str,
                              ids: Sequence[str]) -> dict[str, int]:
        """How many times each pending entry was delivered (``XPENDING`` extended form)."""
        if not ids:
            return {}
        async with self._on(stream) as redis:
            rows = await redis.xpending_range(
                stream, group, min=min(ids, key=stream_id_tuple),
                max=max(ids, key=stream_id_tuple), count=len(ids) * 2, consumername=consumer)
        return {row["message_id"].decode(): int(row["times_delivered"]) for row in rows}

    async def autoclaim(self, stream: str, group: str, consumer: str, min_idle_ms: int,
                        count: int = 100) -> list[Entry]:
        """Move entries idle past ``min_idle_ms`` on any consumer of ``group`` to ``consumer``."""
        claimed: list[Entry] = []
        cursor = "0-0"
        async with self._on(stream) as redis:
            while True:
                reply = await redis.xautoclaim(stream, group, consumer, min_idle_ms,
                                                     start_id=cursor, count=count)
                cursor = reply[0].decode()
                claimed.extend(_decode_entries(reply[1]))
                if cursor == "0-0":
                    return claimed

    async def skip_unknown(self, keys: SwarmKeys, source: str, group: str, entry_id: str, *,
                           ack: bool = True) -> None:
        """Count an event of a type this reader does not know (a newer writer's) in the
        swarm's ``unknown_events`` counter, and acknowledge it at the source (unless ``ack`` is
        false: the caller acknowledges it with other bookkeeping). Schema rule 3."""
        async with self._on(keys.prefix) as redis, redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(keys.counters, "unknown_events", 1)
            if ack:
                pipe.xack(source, group, entry_id)
            await pipe.execute()

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
        async with self._on(keys.prefix) as redis, redis.pipeline(transaction=True) as pipe:
            pipe.xadd(keys.dead_letters, cast(Any, record), maxlen=self.limits.events_maxlen,
                      approximate=True)
            pipe.hincrby(keys.counters, "dead_letters", 1)
            if ack:
                pipe.xack(source, group, entry_id)
            await pipe.execute()
