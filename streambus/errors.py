"""The exceptions streambus raises.

Every Redis error is translated into one of these inside :mod:`streambus.store`, and nowhere
else; code above the store never sees a ``redis.exceptions`` class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class StreambusError(Exception):
    """Base class of every error streambus raises on purpose."""


class InvalidInput(StreambusError, ValueError):
    """A caller passed something streambus cannot accept. Nothing was written."""


class InvalidId(InvalidInput):
    """An id (swarm, channel, coordinator, signal, namespace) breaks the id rules."""


class PayloadTooLarge(InvalidInput):
    """An encoded payload is bigger than the configured limit."""


class MalformedEvent(StreambusError):
    """A stream entry could not be decoded as a streambus event (a poison entry)."""

    def __init__(self, reason: str, fields: dict[bytes, bytes] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fields = fields or {}


class UnknownEvent(MalformedEvent):
    """A well-formed event of a type this reader does not know: a newer writer's. Readers skip
    it (acknowledged and counted), never dead-letter it (schema rule 3)."""

    def __init__(self, event_type: str, fields: dict[bytes, bytes] | None = None) -> None:
        super().__init__(f"unknown event type {event_type!r}", fields)
        self.event_type = event_type


class BusUnavailable(StreambusError, ConnectionError):
    """The Redis server could not be reached (or stayed unreachable past a retry budget)."""


class NotPermitted(StreambusError, PermissionError):
    """The server refused: authentication failed, or its ACL does not allow a command or key.
    Retrying cannot help; the credentials or the user's ACL rules must change."""


class CertificateRejected(NotPermitted):
    """TLS failed on a certificate: the server's could not be verified (``ssl_ca_certs`` does
    not name the CA that signed it, or the host name does not match), or the server refused
    ours (mutual TLS). No retry can help."""


class EmbeddedServerError(BusUnavailable):
    """The embedded server could not be started or found."""


class WaitTimeout(StreambusError, TimeoutError):
    """A wait reached its deadline (in server time) without a signal."""

    def __init__(self, coordinator: str, channel: str, deadline_ms: int,
                 rejected: Sequence[str] = ()) -> None:
        turned_away = (f"; {len(rejected)} signal(s) refused and dead-lettered meanwhile, "
                       f"last: {rejected[-1]}") if rejected else ""
        super().__init__(
            f"coordinator {coordinator!r} timed out waiting on {channel!r} "
            f"(deadline {deadline_ms} ms server time){turned_away}"
        )
        self.coordinator = coordinator
        self.channel = channel
        self.deadline_ms = deadline_ms
        self.rejected = tuple(rejected)
        """Why signals that arrived were refused (``wait --require-signed``)."""


class AckTimeout(StreambusError, TimeoutError):
    """Not every awaited coordinator acknowledged a signal in time."""

    def __init__(self, signal_id: str, acked_by: Sequence[str], missing: Sequence[str], *,
                 rejected: Mapping[str, str] | None = None) -> None:
        rejected = dict(rejected or {})
        super().__init__(
            f"signal {signal_id!r}: no ACK from {', '.join(missing)} "
            f"(acknowledged by {', '.join(acked_by) or 'nobody'})"
            + "".join(f"; rejected: {why}" for why in rejected.values())
        )
        self.signal_id = signal_id
        self.acked_by = tuple(acked_by)
        self.missing = tuple(missing)
        self.rejected = rejected
        """Why the ACK recorded for each coordinator named here did not verify (a
        ``require_signed`` wait); those coordinators are among ``missing``."""
        self.published: Any = None
        """The publish's result (``streambus.Published``), when a publish was waiting."""


class PeerDead(StreambusError):
    """A watched peer's heartbeat is older than ``dead_after`` (in server time)."""

    def __init__(self, peers: dict[str, float]) -> None:
        ages = ", ".join(f"{peer} ({age:.1f} s without a beat)" for peer, age in peers.items())
        super().__init__(f"peer dead: {ages}")
        self.peers = dict(peers)


class Backpressure(StreambusError):
    """A coordinator's retry backlog is full; the request was not appended."""

    def __init__(self, coordinator: str, backlog: int, limit: int) -> None:
        super().__init__(
            f"retry backlog of {coordinator!r} is full ({backlog} >= {limit}); request not sent"
        )
        self.coordinator = coordinator
        self.backlog = backlog
        self.limit = limit


class DurabilityNotReached(StreambusError):
    """A publish was appended but not confirmed at the requested durability level in time."""


class DurabilityUnsupported(DurabilityNotReached, InvalidInput):
    """The server cannot confirm the durability level asked for (``fsync`` needs ``WAITAOF``,
    Redis >= 7.2 or Valkey). Checked before anything is written: nothing was published."""


class LeaseLost(StreambusError):
    """A lease (``streambus.lease``) could not be renewed in time: its job was stopped, so that
    the instance that takes it over never runs beside this one."""
