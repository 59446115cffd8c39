"""Signals, waits and ACKs: the operations on the signal path."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.exceptions as rex

from streambus.errors import DurabilityUnsupported
from streambus.keys import ACKED_EXPIRY_MARK, SwarmKeys
from streambus.schema import FIELD
from streambus.store._base import (
    Durability,
    Entry,
    GroupRead,
    Receipt,
    SwarmSnapshot,
    WaitStart,
    _check_durability,
    _chunks,
    _decode_entries,
    _scripted_reads,
    _StoreBase,
)
from streambus.store._errors import UnknownCommand, translate


class SignalOps(_StoreBase):
    """Signals, waits and ACKs: the operations on the signal path."""

    _waitaof: dict[int, bool]

    async def swarm_snapshot(self, keys: SwarmKeys) -> SwarmSnapshot:
        """Server time, every coordinator's state hash, last beat and retry backlog: two
        round trips, whatever the number of coordinators."""
        async with self._on(keys.prefix) as redis:
            async with redis.pipeline(transaction=False) as pipe:
                pipe.time()
                pipe.zrange(keys.coordinators, 0, -1)
                pipe.zrange(keys.alive, 0, -1, withscores=True)
                pipe.hgetall(keys.retry_backlog)
                (seconds, micros), ids, beats, backlog = await pipe.execute()
            async with redis.pipeline(transaction=False) as pipe:
                for coordinator in ids:
                    pipe.hgetall(keys.state(coordinator.decode()))
                rows = await pipe.execute()
        return SwarmSnapshot(
            now_ms=int(seconds) * 1000 + int(micros) // 1000,
            states=[{k.decode(): v.decode() for k, v in row.items()} for row in rows if row],
            beats={c.decode(): int(score) for c, score in beats},
            backlog={c.decode(): int(n) for c, n in backlog.items()},
        )

    async def acks_snapshot(self, keys: SwarmKeys, signal_id: str,
                            coordinators: Sequence[str] | None = None
                            ) -> tuple[str, dict[str, str]]:
        """The acks stream's last id, then who acknowledged ``signal_id`` (probe first): every
        coordinator, or only those of ``coordinators`` (the ones still awaited, so a sender
        waiting for 10,000 ACKs does not re-read those it already has on every wake)."""
        async with self._on(keys.prefix) as redis, redis.pipeline(transaction=False) as pipe:
            pipe.xrevrange(keys.acks, count=1)
            if coordinators is None:
                pipe.hgetall(keys.acked(signal_id))
            else:
                pipe.hmget(keys.acked(signal_id), list(coordinators))
            last, acked = await pipe.execute()
        last_id = last[0][0].decode() if last else "0-0"
        if coordinators is None:
            return last_id, {k.decode(): v.decode() for k, v in acked.items()
                             if k.decode() != ACKED_EXPIRY_MARK}
        return last_id, {c: v.decode() for c, v in zip(coordinators, acked, strict=True) if v}

    async def ack_entries(self, keys: SwarmKeys, ack_ids: Sequence[str]) -> list[Entry]:
        """The entries of the acks stream with these ids, in order, in one round trip; an id
        that names no entry (trimmed, or never written) comes back with no fields."""
        async with self._on(keys.prefix) as redis, redis.pipeline(transaction=False) as pipe:
            for ack_id in ack_ids:
                pipe.xrange(keys.acks, ack_id, ack_id, count=1)
            replies = await pipe.execute(raise_on_error=False)
        entries: list[Entry] = []
        for ack_id, reply in zip(ack_ids, replies, strict=True):
            if isinstance(reply, BaseException):
                if isinstance(reply, rex.ResponseError) and "Invalid stream ID" in str(reply):
                    entries.append((ack_id, None))  # a forged id that is no stream id
                    continue
                raise translate(reply, self._user)
            found = _decode_entries(reply)
            # Only that id's entry: "+" or "-" (written by a forger) would name another.
            entries.append(found[0] if found and found[0][0] == ack_id else (ack_id, None))
        return entries

    async def publish(self, keys: SwarmKeys, channel: str, signal_id: str, event: bytes, *,
                      durability: Durability = "none", durability_timeout_ms: int = 1000,
                      ) -> tuple[str, bool]:
        """Append a signal unless its id was published in the last 24 h: ``(stream_id, dup)``.

        ``durability`` "fsync" confirms the write reached the server's append-only file
        (``WAITAOF 1 0``, Redis >= 7.2 / Valkey); "replicated" that a replica has it
        (``WAIT 1``). Both run on the publish's own connection, as they must.
        """
        script_keys = [keys.dedupe(signal_id), keys.channel(channel)]
        script_args = [event, self.limits.dedupe_ttl_s, self.limits.channel_retention_ms, FIELD]
        if durability == "none":  # one command: no pipeline's overhead on the signal's path
            async with self._on(keys.prefix) as redis:
                dup, stream_id = await self._scripts.call(redis, "publish", keys=script_keys,
                                                          args=script_args)
            return stream_id.decode(), bool(dup)

        def build(pipe: Any) -> None:
            self._scripts.queue(pipe, "publish", keys=script_keys, args=script_args)
            if durability == "fsync":
                pipe.execute_command("WAITAOF", 1, 0, durability_timeout_ms)
            elif durability == "replicated":
                pipe.execute_command("WAIT", 1, durability_timeout_ms)

        async with self._on(keys.prefix) as redis:
            if durability == "fsync" and not await self._has_waitaof(redis):
                raise DurabilityUnsupported(
                    "durability 'fsync' needs WAITAOF (Redis >= 7.2 or Valkey), which this "
                    "server lacks; nothing was published (use 'replicated' or 'none')")
            replies = await self._scripts.pipeline(redis, build)
        published = replies[0]
        if isinstance(published, BaseException):
            raise translate(published, self._user)
        dup, stream_id = published
        _check_durability(durability, replies[1], stream_id.decode(), self._user)
        return stream_id.decode(), bool(dup)

    async def _has_waitaof(self, redis: Any) -> bool:
        """Whether the server knows ``WAITAOF`` (asked once per server)."""
        if (known := self._waitaof.get(id(redis))) is None:
            try:  # asks for nothing, so it answers at once where the command exists
                await redis.execute_command("WAITAOF", 0, 0, 0)
                known = True
            except rex.ResponseError as exc:
                if not isinstance(translate(exc), UnknownCommand):
                    raise
                known = False
            self._waitaof[id(redis)] = known
        return known

    async def begin_wait(
        self, keys: SwarmKeys, coordinator: str, channel: str, timeout_ms: int, iteration: int,
        watches: Sequence[str] = (), *, token: str = "", claim: str = "",
    ) -> WaitStart:
        """Create the coordinator's group (at 0) and record the wait, keeping an open deadline.

        ``token`` names this wait (a retry of a lost reply is the same wait; ``end_wait`` can
        end it by token). ``claim`` is the token of a wait of this process that may have
        received a signal and not handed it over: with ``iteration=0`` that signal is answered
        again rather than skipped (if nothing has happened to that wait since).
        """
        async with self._on(keys.prefix) as redis:
            reply = await self._scripts.call(
                redis, "begin_wait",
                keys=[keys.state(coordinator), keys.channel(channel), keys.events,
                      keys.coordinators, keys.withdrawn(coordinator)],
                args=[coordinator, channel, timeout_ms, self.limits.state_ttl_s, iteration, FIELD,
                      self.limits.events_maxlen, ",".join(watches), token, claim],
            )
        now, deadline, iteration, mode = (int(x) for x in reply[:4])
        received = reply[4].decode() if mode == 2 else ""
        started = int(reply[5]) if len(reply) > 5 else (0 if mode else now)
        return WaitStart(now, deadline, iteration, mode == 1, received, started,
                         withdrawn=mode == 3)

    async def entry(self, stream: str, stream_id: str) -> Entry | None:
        """One entry by id, or ``None`` if it is gone (trimmed)."""
        async with self._on(stream) as redis:
            raw = await redis.xrange(stream, min=stream_id, max=stream_id, count=1)
        entries = _decode_entries(raw)
        return entries[0] if entries else None

    async def ack_id(self, keys: SwarmKeys, signal_id: str, coordinator: str) -> str:
        """The id of ``coordinator``'s Ack of ``signal_id`` (``""`` if it has none)."""
        async with self._on(keys.prefix) as redis:
            raw = await redis.hget(keys.acked(signal_id), coordinator)
        return raw.decode() if raw else ""

    async def end_wait(
        self,
        keys: SwarmKeys,
        coordinator: str,
        channel: str,
        iteration: int,
        state: str,
        ended_event: bytes,
        *,
        token: str = "",
    ) -> bool:
        """Record how a wait ended, if it is still the open wait. False: already ended.

        ``iteration=0`` ends the wait begun with ``token`` (its ``begin_wait`` reply was lost),
        or, if that has not run yet, stops it from starting. If the wait ``token`` holds a
        signal it never handed over, the signal is marked unclaimed: the coordinator's next
        wait on the channel returns it.
        """
        async with self._on(keys.prefix) as redis:
            changed = await self._scripts.call(
                redis, "end_wait", keys=[keys.state(coordinator), keys.events, keys.coordinators,
                                         keys.withdrawn(coordinator)],
                args=[channel, iteration, state, ended_event, FIELD, self.limits.state_ttl_s,
                      self.limits.events_maxlen, token],
            )
        return bool(changed)

    async def receive_many(self, receipts: Sequence[Receipt]) -> list[str | BaseException]:
        """Acknowledge delivered signals (one swarm) in one round trip; return each Ack's id."""
        if not receipts:
            return []
        async with self._on(receipts[0].keys.prefix) as redis:
            return await self.receive_on(redis, receipts)

    async def receive_on(self, redis: Any, receipts: Sequence[Receipt]
                         ) -> list[str | BaseException]:
        """:meth:`receive_many` through ``redis``, a client of the swarm's master (a blocking
        reader's, between its reads); the caller translates connection errors."""
        if not receipts:
            return []
        keys = receipts[0].keys
        if any(r.keys != keys for r in receipts):
            raise ValueError("receive_many takes the receipts of one swarm")
        chunks = [_grouped(chunk) for chunk in _chunks(receipts)]

        def call_args(groups: list[list[Receipt]]) -> dict[str, Any]:
            # What a group's receipts share (a fan-out: all of them) is sent once.
            heads = [g[0] for g in groups]
            return {
                "keys": [keys.acks, keys.events,
                         *(k for r in heads for k in (keys.channel(r.channel),
                                                      keys.acked(r.signal_id))),
                         *(keys.state(r.coordinator) for g in groups for r in g)],
                "args": [FIELD, self.limits.events_maxlen, self.limits.dedupe_ttl_s,
                         len(groups),
                         *(a for g in groups for a in (g[0].channel, g[0].signal_id,
                                                       g[0].stream_id, len(g))),
                         *(a for g in groups for r in g
                           for a in (r.coordinator, int(r.iteration), int(r.started_ms),
                                     r.key_id, r.sig))],
            }

        if len(chunks) == 1:  # the common case, without a pipeline's overhead
            try:
                replies: list[Any] = [await self._scripts.call(redis, "receive",
                                                              **call_args(chunks[0]))]
            except rex.ResponseError as exc:
                replies = [exc]
        else:
            def build(pipe: Any) -> None:
                for chunk in chunks:
                    self._scripts.queue(pipe, "receive", **call_args(chunk))

            replies = await self._scripts.pipeline(redis, build)
        by_receipt: dict[int, str | BaseException] = {}
        for groups, reply in zip(chunks, replies, strict=True):
            sent = [r for g in groups for r in g]
            if isinstance(reply, BaseException):
                error = translate(reply, self._user)
                by_receipt.update((id(r), error) for r in sent)
            else:
                by_receipt.update((id(r), a.decode()) for r, a in zip(sent, reply, strict=True))
        return [by_receipt[id(r)] for r in receipts]

    async def read_groups(
        self, reads: Sequence[GroupRead], probes: Sequence[str] = ()
    ) -> tuple[list[str], list[list[Entry] | BaseException]]:
        """One round trip: the last id of each ``probes`` stream, then each group read.

        The probes run first, so an entry appended after a probe is either returned by a group
        read or newer than the probed id; a blocking ``XREAD`` from the probed id cannot miss it.
        The reads run as one script call per chunk: each waiter's ``XREADGROUP ... COUNT 1``,
        delivering into its PEL and acknowledging nothing. A ``pending`` read that finds no
        pending entry reads a new one in the same step.
        """
        def build(pipe: Any) -> None:
            for stream in probes:
                pipe.xrevrange(stream, count=1)
            for chunk in _chunks(reads):
                self._scripts.queue(
                    pipe, "deliver", keys=[read.stream for read in chunk],
                    args=[a for read in chunk
                          for a in (read.group, "0" if read.pending else ">")])

        route = probes[0] if probes else reads[0].stream  # one swarm: one slot, one master
        async with self._on(route) as redis:
            replies = await self._scripts.pipeline(redis, build)
        last_ids = []
        for reply in replies[: len(probes)]:
            if isinstance(reply, Exception):
                raise translate(reply, self._user)
            last_ids.append(reply[0][0].decode() if reply else "0-0")
        reads_out: list[list[Entry] | BaseException] = []
        for chunk, reply in zip(_chunks(reads), replies[len(probes):], strict=True):
            if isinstance(reply, BaseException):
                reads_out.extend([translate(reply, self._user)] * len(chunk))
            else:
                reads_out.extend(_scripted_reads(reply, self._user))
        return last_ids, reads_out


def _grouped(receipts: Sequence[Receipt]) -> list[list[Receipt]]:
    """Receipts by the entry they received, in order of first appearance."""
    groups: dict[tuple[str, str, str], list[Receipt]] = {}
    for receipt in receipts:
        groups.setdefault((receipt.channel, receipt.stream_id, receipt.signal_id),
                          []).append(receipt)
    return list(groups.values())
