"""Retry requests: validators ask a coordinator to redo work; it handles them while it blocks.

Each coordinator has a retry stream (``retry:<coordinator>``) read through a consumer group
named after the coordinator. Every process that consumes it is a consumer of its own
(``<coordinator>.<instance>``), so entries stranded on a process that died are claimed by the
next one (``XAUTOCLAIM``) once they have been idle for ``claim_idle``.

**Who may claim what.** Only consumers of a coordinator's own retry group: the same
coordinator restarted, or a replacement that explicitly takes over that coordinator's queue
(``RetryConsumer(..., coordinator=dead_id)``). Signal channels need no claiming: their consumer
name is the coordinator id itself, so a restarted coordinator reads its own pending entries.

**Backpressure.** Each coordinator's backlog (appended, not yet processed) is counted next to
the stream, atomically with the append and the acknowledgement. Past ``backlog_limit`` (default
1000), :func:`request_retry` raises :class:`Backpressure`, or with ``wait`` retries until the
backlog drains or the wait ends. Nothing is ever dropped silently.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import anyio
import anyio.abc

from streambus.backoff import Backoff, keep_running
from streambus.errors import Backpressure, MalformedEvent, UnknownEvent
from streambus.keys import SwarmKeys, validate_id
from streambus.schema import RetryRequest, decode_fields, encode
from streambus.store import Entry, Store

log = logging.getLogger(__name__)

RetryHandler = Callable[[RetryRequest], Awaitable[None] | None]
"""Called once per retry request; the request is acknowledged when it returns."""

DEFAULT_BACKLOG_LIMIT: Final = 1000
_BATCH: Final = 500


@dataclass(frozen=True, slots=True)
class RetrySent:
    request_id: str
    stream_id: str
    duplicate: bool


async def request_retry(
    store: Store,
    keys: SwarmKeys,
    request: RetryRequest,
    *,
    backlog_limit: int = DEFAULT_BACKLOG_LIMIT,
    wait: float = 0.0,
) -> RetrySent:
    """Append ``request`` to its coordinator's retry stream, honouring the backlog limit."""
    validate_id(request.coordinator, "coordinator id")
    request_id = validate_id(request.request_id, "request id")
    raw = encode(request)
    deadline = anyio.current_time() + wait
    backoff = Backoff()
    while True:
        status, value = await store.request_retry(keys, request.coordinator, request_id, raw,
                                                  backlog_limit)
        if status != 2:
            return RetrySent(request_id, value, duplicate=status == 1)
        left = deadline - anyio.current_time()
        if left <= 0:
            raise Backpressure(request.coordinator, int(value), backlog_limit)
        await backoff.sleep(limit=left)


def new_request_id() -> str:
    return uuid.uuid4().hex


class RetryConsumer:
    """Processes one coordinator's retry requests until cancelled.

    Reads its own pending entries first, then claims entries stranded on dead consumers, then
    blocks for new ones in batches. A handler failure leaves the request pending; after
    ``max_attempts`` deliveries it goes to the dead-letter stream, as poison does.
    """

    def __init__(self, store: Store, keys: SwarmKeys, coordinator: str, handler: RetryHandler,
                 *, claim_idle: float = 30.0, max_attempts: int = 5, block_ms: int = 1000) -> None:
        self.store = store
        self.keys = keys
        self.coordinator = validate_id(coordinator, "coordinator id")
        self.consumer = f"{coordinator}.{uuid.uuid4().hex[:12]}"
        self.stream = keys.retries(coordinator)
        self.handler = handler
        self.claim_idle_ms = round(claim_idle * 1000)
        self.max_attempts = max_attempts
        self._block_ms = block_ms
        self.processed = 0
        self.failed = 0
        self.dead_lettered = 0
        self.skipped = 0

    def __repr__(self) -> str:
        return (f"<RetryConsumer {self.coordinator!r} consumer={self.consumer!r} "
                f"processed={self.processed} failed={self.failed}>")

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        reader = self.store.blocking_reader(block_ms=self._block_ms, route=self.stream)
        try:
            await self._start()
            task_status.started()
            await keep_running(lambda: self._round(reader), on_unavailable=lambda exc: log.warning(
                "retry consumer %s: %s", self.consumer, exc))
        finally:
            with anyio.CancelScope(shield=True):
                await reader.aclose()

    async def _start(self) -> None:
        await self.store.ensure_group(self.stream, self.coordinator)
        claimed = await self.store.autoclaim(self.stream, self.coordinator, self.consumer,
                                             self.claim_idle_ms)
        if claimed:
            log.info("retry consumer %s claimed %d stranded requests", self.consumer,
                     len(claimed))

    async def _round(self, reader: Any) -> None:
        """Pending entries first (claimed, or failed before), then new ones."""
        pending = await reader.read_group(self.stream, self.coordinator, self.consumer,
                                          pending=True, count=_BATCH)
        if pending:
            await self._process(pending, redelivered=True)
            return
        fresh = await reader.read_group(self.stream, self.coordinator, self.consumer,
                                        pending=False, count=_BATCH)
        await self._process(fresh, redelivered=False)

    async def _process(self, entries: list[Entry], *, redelivered: bool) -> None:
        counts = (await self.store.delivery_counts(self.stream, self.coordinator, self.consumer,
                                                   [e[0] for e in entries])
                  if redelivered else {})
        done: list[str] = []
        for entry in entries:
            # Every read of a pending entry (ID 0, or a claim) bumps its delivery count, so
            # deliveries - 1 is how often a handler already failed on it, in any process.
            if await self._handle(entry, counts.get(entry[0], 1) - 1):
                done.append(entry[0])
        await self.store.retries_done(self.keys, self.coordinator, done)
        if len(done) < len(entries):
            failing = Backoff()
            failing.attempt = max(counts.values(), default=1)
            await failing.sleep()

    async def _handle(self, entry: Entry, failures: int) -> bool:
        """Run the handler on one entry; True when it may be acknowledged."""
        entry_id, fields = entry
        try:
            request = decode_fields(fields)
            if not isinstance(request, RetryRequest):
                raise MalformedEvent(f"a {type(request).__name__} event on a retry stream")
        except UnknownEvent:
            # A newer writer's event type (schema rule 3): acknowledged with the batch, counted.
            await self.store.skip_unknown(self.keys, self.stream, self.coordinator, entry_id,
                                          ack=False)
            self.skipped += 1
            return True
        except MalformedEvent as exc:
            await self._dead_letter(entry, exc.reason)
            return True
        if failures >= self.max_attempts:
            await self._dead_letter(entry, f"handler failed {failures} times")
            return True
        try:
            result = self.handler(request)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            self.failed += 1
            log.warning("retry handler of %s failed on %s: %r", self.coordinator, entry_id, exc)
            return False
        self.processed += 1
        return True

    async def _dead_letter(self, entry: Entry, reason: str) -> None:
        """Copy the entry aside; the caller acknowledges it with the batch (backlog shrinks)."""
        log.warning("retry request %s of %s dead-lettered: %s", entry[0], self.coordinator, reason)
        await self.store.dead_letter(self.keys, self.stream, self.coordinator, entry, reason,
                                     ack=False)
        self.dead_lettered += 1
