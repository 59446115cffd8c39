"""A lease: one holder at a time for a job of a swarm (the trace projector, say).

A job whose effects are not idempotent across instances (the trace projector emits one span per
signal; two instances splitting the Acks would each emit one) runs under a lease: the holder
renews it every third of its time to live; the others stand by and take it over once it lapses
(a holder that stops cleanly releases it at once). A holder that cannot renew in time (the bus
away, or the process frozen long enough for another to take over) stops its job before the
lease can have passed on, so two holders never run at once beyond the clocks' drift.

>>> lease = bus.lease("epic-7", "traces", ttl=10)                     # doctest: +SKIP
>>> await lease.run(project)  # stands by, then runs project() while it holds the lease
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Final

import anyio

from streambus.backoff import Backoff
from streambus.errors import BusUnavailable, InvalidInput, LeaseLost, StreambusError
from streambus.keys import SwarmKeys, validate_id
from streambus.store import Store

log = logging.getLogger(__name__)

_SAFETY: Final = 0.8
"""A holder stops its job once this share of the time to live passed without a renewal."""


class Lease:
    """The lease of one job of one swarm, as held (or waited for) by this process."""

    def __init__(self, store: Store, keys: SwarmKeys, job: str, *, ttl: float = 10.0) -> None:
        if not 0.3 <= ttl <= 3600:
            raise InvalidInput(f"lease time to live {ttl} s: use 0.3 s to 1 h")
        self._store = store
        self.keys = keys
        self.job = validate_id(job, "job")
        self.ttl_s = ttl
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.held = False
        self.takeovers = 0
        self._renewed_at = 0.0

    def __repr__(self) -> str:
        return (f"<Lease {self.job!r} swarm={self.keys.swarm!r} holder={self.holder!r} "
                f"held={self.held}>")

    async def _try(self, *, release: bool = False) -> tuple[bool, str, int]:
        return await self._store.lease(self.keys, self.job, self.holder,
                                       round(self.ttl_s * 1000), release=release)

    async def acquire(self) -> None:
        """Wait (standing by) until this process holds the lease."""
        backoff = Backoff()
        announced = ""
        while True:
            sent = anyio.current_time()
            try:
                held, holder, left_ms = await self._try()
            except BusUnavailable as exc:
                log.warning("lease %s of swarm %s: %s", self.job, self.keys.swarm, exc)
                await backoff.sleep()
                continue
            backoff.reset()
            if held:
                self.held = True
                self._renewed_at = sent
                self.takeovers += 1
                log.info("lease %s of swarm %s taken by %s", self.job, self.keys.swarm,
                         self.holder, extra={"event": "lease_taken", "swarm": self.keys.swarm,
                                             "job": self.job, "holder": self.holder})
                return
            if holder != announced:
                announced = holder
                log.info("lease %s of swarm %s is held by %s: standing by", self.job,
                         self.keys.swarm, holder, extra={
                             "event": "lease_standby", "swarm": self.keys.swarm,
                             "job": self.job, "holder": holder})
            await anyio.sleep(min(self.ttl_s / 3, max(0.05, left_ms / 1000)))

    async def release(self) -> None:
        """Give the lease up now (best effort: otherwise it lapses after its time to live)."""
        self.held = False
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.ttl_s / 3):
            try:
                await self._try(release=True)
            except StreambusError as exc:
                log.warning("lease %s of swarm %s not released: %s", self.job,
                            self.keys.swarm, exc)

    async def run(self, job: Callable[[], Awaitable[object]]) -> None:
        """Stand by until the lease is ours, then run ``job`` while it is held.

        Returns when ``job`` returns (the lease is released). Raises :class:`LeaseLost` after
        stopping ``job`` when the lease could not be renewed in time: the job runs under a
        deadline of 80 % of the time to live after the last renewal *sent*, so it has stopped
        before the lease can lapse and pass on, however the renewals fail or hang.
        """
        await self.acquire()
        lost: LeaseLost | None = None
        scope = anyio.CancelScope(deadline=self._renewed_at + _SAFETY * self.ttl_s)
        try:
            async with anyio.create_task_group() as tg:

                async def renew() -> None:
                    nonlocal lost
                    while True:
                        await anyio.sleep(self.ttl_s / 3)
                        sent = anyio.current_time()
                        with anyio.move_on_after(max(0.0, scope.deadline - sent)):
                            try:
                                held, holder, _ = await self._try()
                            except BusUnavailable:
                                continue
                            if held:
                                scope.deadline = sent + _SAFETY * self.ttl_s
                                continue
                            lost = LeaseLost(f"lease {self.job} of swarm {self.keys.swarm} "
                                             f"passed to {holder}")
                            scope.cancel()
                            return

                tg.start_soon(renew)
                with scope:
                    await job()
                tg.cancel_scope.cancel()
            if scope.cancelled_caught and lost is None:
                lost = LeaseLost(f"lease {self.job} of swarm {self.keys.swarm} not renewed "
                                 f"for {_SAFETY * self.ttl_s:.1f} s")
        finally:
            if lost is None:
                await self.release()
            else:
                self.held = False
                log.warning("%s: the job was stopped", lost, extra={
                    "event": "lease_lost", "swarm": self.keys.swarm, "job": self.job})
        if lost is not None:
            raise lost
