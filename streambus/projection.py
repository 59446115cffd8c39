"""Projectors: consumers that turn a swarm's event streams into a view.

A :class:`Projection` says which streams it reads and how one event changes its view; it must
be idempotent (applying an entry twice changes nothing), because delivery is at-least-once. A
:class:`Projector` runs it: it reads the streams through the projection's own consumer group
(``proj.<name>``), created at the start of each stream, so a new projection sees the whole
retained history, applies each entry, acknowledges it (its position survives restarts), and
moves poison entries to the dead-letter stream. Several projectors of one projection share the
work as consumers of one group; entries stranded on a dead one are claimed after ``claim_idle``.
:meth:`Projector.rebuild` resets the view and replays from the beginning.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Final, Protocol

import anyio
import anyio.abc

from streambus.backoff import Backoff
from streambus.errors import BusUnavailable, MalformedEvent, StreambusError, UnknownEvent
from streambus.keys import SwarmKeys
from streambus.schema import AnyEvent, decode_fields
from streambus.store import BlockingReader, Entry, GroupMissing, Store

log = logging.getLogger(__name__)

_BATCH: Final = 500


class Projection(Protocol):
    """A view built from events. ``apply`` must be idempotent."""

    name: str

    def streams(self, keys: SwarmKeys) -> Sequence[str]:
        """The streams this projection reads (all of one swarm)."""
        ...

    async def apply(self, keys: SwarmKeys, stream: str, entry_id: str, event: AnyEvent) -> None:
        """Apply one event; applying the same entry again must change nothing."""
        ...

    async def reset(self, keys: SwarmKeys) -> None:
        """Forget the view (before a rebuild)."""
        ...


class Projector:
    """Runs one projection over one swarm's streams until cancelled."""

    def __init__(self, store: Store, keys: SwarmKeys, projection: Projection, *,
                 claim_idle: float = 30.0, block_ms: int = 1000) -> None:
        self.store = store
        self.keys = keys
        self.projection = projection
        self.group = f"proj.{projection.name}"
        self.consumer = f"{self.group}.{uuid.uuid4().hex[:12]}"
        self.claim_idle_ms = round(claim_idle * 1000)
        self.block_ms = block_ms
        self.applied = 0
        self.dead_lettered = 0
        self.skipped = 0
        """Entries of event types this projector does not know (a newer writer's)."""

    def __repr__(self) -> str:
        return (f"<Projector {self.projection.name!r} swarm={self.keys.swarm!r} "
                f"consumer={self.consumer!r} applied={self.applied}>")

    @property
    def streams(self) -> list[str]:
        return list(self.projection.streams(self.keys))

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Catch up on everything pending, report ready, then follow the streams.

        Connection loss, at start or later, is retried with backoff; lost groups (a restart
        without persistence) are created again. Entries stranded on dead instances are claimed
        every ``claim_idle``. On the way out the consumer removes itself if it holds nothing.
        """
        reader = self.store.blocking_reader(block_ms=self.block_ms, route=self.keys.prefix)
        ready, prepared_at, backoff = False, None, Backoff()
        try:
            while True:
                try:
                    now = anyio.current_time()
                    if prepared_at is None or now - prepared_at > self.claim_idle_ms / 1000:
                        await self._prepare()  # groups exist, stranded entries claimed
                        prepared_at = now
                    applied = await self._step(reader, block=ready)
                    if not ready and not applied:
                        task_status.started()  # caught up
                        ready = True
                    backoff.reset()
                except (BusUnavailable, GroupMissing) as exc:
                    log.warning("projector %s: %s", self.consumer, exc)
                    prepared_at = None
                    await backoff.sleep()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await reader.aclose()
                await self._retire()

    async def _retire(self) -> None:
        """Remove this consumer from its groups unless it still holds pending entries."""
        for stream in self.streams:
            try:
                await self.store.retire_consumer(stream, self.group, self.consumer)
            except StreambusError as exc:
                log.debug("projector %s could not retire from %s: %s", self.consumer, stream,
                          exc)

    async def catch_up(self) -> int:
        """Apply every entry not yet applied (claimed, pending, then new); return how many."""
        await self._prepare()
        reader = self.store.blocking_reader(block_ms=self.block_ms, route=self.keys.prefix)
        total = 0
        try:
            while applied := await self._step(reader, block=False):
                total += applied
        finally:
            with anyio.CancelScope(shield=True):
                await reader.aclose()
        return total

    async def rebuild(self) -> int:
        """Reset the view and replay every retained entry from the start."""
        await self.projection.reset(self.keys)
        for stream in self.streams:
            await self.store.reset_group(stream, self.group)
        return await self.catch_up()

    async def _prepare(self) -> None:
        for stream in self.streams:
            await self.store.ensure_group(stream, self.group)
            await self.store.autoclaim(stream, self.group, self.consumer, self.claim_idle_ms)

    async def _step(self, reader: BlockingReader, *, block: bool) -> int:
        """One batch: this consumer's pending entries first, then new ones."""
        streams = self.streams
        batches = await reader.read_groups(streams, self.group, self.consumer, pending=True,
                                           count=_BATCH, block=False)
        if not any(batches.values()):
            batches = await reader.read_groups(streams, self.group, self.consumer,
                                               pending=False, count=_BATCH, block=block)
        for stream, entries in batches.items():
            await self._apply_all(stream, entries)
        return sum(len(entries) for entries in batches.values())

    async def _apply_all(self, stream: str, entries: list[Entry]) -> None:
        done: list[str] = []
        for entry_id, fields in entries:
            try:
                event = decode_fields(fields)
            except UnknownEvent:
                # A newer writer's event type (schema rule 3): acknowledged with the batch,
                # counted, never dead-lettered.
                await self.store.skip_unknown(self.keys, stream, self.group, entry_id, ack=False)
                self.skipped += 1
                done.append(entry_id)
                continue
            except MalformedEvent as exc:
                await self.store.dead_letter(self.keys, stream, self.group, (entry_id, fields),
                                             exc.reason)
                self.dead_lettered += 1
                continue
            try:
                await self.projection.apply(self.keys, stream, entry_id, event)
            except BusUnavailable:
                raise  # transient: the entry stays pending and is applied on the next try
            except Exception as exc:
                # An event the projection cannot apply is poison for it: set it aside with
                # the reason rather than stop the projector on it forever.
                log.exception("projector %s cannot apply %s", self.consumer, entry_id)
                await self.store.dead_letter(self.keys, stream, self.group, (entry_id, fields),
                                             f"{self.projection.name} failed: {exc!r}")
                self.dead_lettered += 1
                continue
            done.append(entry_id)
            self.applied += 1
        await self.store.ack(stream, self.group, done)
