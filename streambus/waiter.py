"""A waiter: one coordinator's open wait, as the dispatcher serves it.

Its life is one :class:`WaiterState`, moved by the dispatcher alone; its coordinator adds it,
withdraws it and reads its :data:`Outcome`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from streambus.keys import SwarmKeys
from streambus.schema import Signal
from streambus.signing import Keyring
from streambus.store import Receipt


class WaiterState(enum.Enum):
    """Where a waiter is in its life. Only the dispatcher moves it."""

    QUEUED = "queued"
    """Served: it reads when its stream grows (or when it was just added)."""
    DELIVERING = "delivering"
    """A read or a receipt for it is in flight."""
    ABANDONED = "abandoned"
    """Its coordinator was cancelled while a delivery was in flight: whatever that read
    returns stays in the PEL for the coordinator's next wait."""
    WITHDRAWN = "withdrawn"
    """Its coordinator gave up with nothing in flight; nothing more is read for it."""
    SETTLED = "settled"
    """It has its outcome."""


@dataclass(frozen=True, slots=True)
class Received:
    """A signal delivered to a waiter and acknowledged (the receive script's reply came)."""

    signal: Signal
    stream_id: str
    ack_id: str


Outcome = Received | BaseException | None
"""How a wait ended for the dispatcher: received, an error, or nothing (deadline/cancel)."""


@dataclass(eq=False)
class Waiter:
    """One coordinator's open wait for one signal on one channel."""

    keys: SwarmKeys
    coordinator: str
    channel: str
    stream: str
    iteration: int
    reconnect_budget_s: float = 300.0
    token: str = ""
    """The wait's token on the bus (``begin_wait``): who may give back a signal not handed over."""
    started_ms: int = 0
    """When the wait began (server ms), carried by the lifecycle events it ends with."""
    state: WaiterState = WaiterState.QUEUED
    outcome: Outcome = None
    read_pending: bool = True
    """The next read is of the waiter's own PEL (``ID 0``), not of new entries."""
    unconfirmed: Receipt | None = None
    """A receipt sent whose reply never came: it may have been applied. Sent again (the
    receive script is idempotent) before anything new is read for this waiter."""
    deferred: BaseException | None = None
    """An error (a dead peer) to end the wait with once the delivery in flight lands."""
    settled: anyio.Event = field(default_factory=anyio.Event)
    verify: Callable[[Signal], str | None] | None = None
    """Set for a wait that takes only signed signals: why a signal fails, or ``None``."""
    rejected: list[str] = field(default_factory=list)
    """Why the signals this waiter refused failed (dead-lettered, they woke nobody)."""
    signing: Keyring | None = None
    """Set when the coordinator holds the swarm's key: it signs its ACKs."""

    def __repr__(self) -> str:
        return (f"<Waiter {self.coordinator!r} on {self.keys.swarm}/{self.channel} "
                f"iteration={self.iteration} {self.state.value}>")

    def receipt(self, signal: Signal, stream_id: str) -> Receipt:
        """What the ``receive`` script records when this waiter takes ``signal``."""
        key_id, sig = ("", "") if self.signing is None else self.signing.sign_ack(
            self.keys.swarm, self.channel, signal.signal_id, self.coordinator, stream_id,
            self.iteration)
        return Receipt(self.keys, self.coordinator, self.channel, stream_id, signal.signal_id,
                       self.iteration, self.started_ms, key_id, sig)
