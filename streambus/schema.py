"""The events streambus appends to Redis Streams, and their one encoder and decoder.

Every stream entry carries one event, encoded as JSON in the entry's ``e`` field. Events are a
tagged union (the ``type`` field); every event carries a schema version ``v``.

Schema-evolution rules (tests decode the fixtures in ``tests/fixtures/events`` to hold us to
them):

1. A new field must have a default, so entries written before it still decode.
2. A field never changes type and is never renamed; retire it by leaving it unused.
3. Decoders ignore fields they do not know, so an older reader accepts a newer writer's entry.
   An event whose *type* a reader does not know decodes as :class:`UnknownEvent`: readers
   acknowledge it, count it (the swarm's ``unknown_events`` counter) and go on; it is not
   poison and is never dead-lettered.
4. ``v`` is bumped when the meaning of an event changes; readers never reject a higher ``v``.
5. A ``type`` tag is never reused for a different event.

An event's server time is its stream id (``<ms>-<seq>``, taken from the server clock by
``XADD *``), so events carry no wall-clock timestamps of their own writers: clock skew between
machines cannot reach them.
"""

from __future__ import annotations

import enum
from typing import Any, Final, Generic, TypeVar

import msgspec

from streambus.errors import MalformedEvent, UnknownEvent

SCHEMA_VERSION: Final = 1
FIELD: Final = b"e"
"""The stream entry field that holds the encoded event."""


class Outcome(enum.StrEnum):
    """How a blocking wait ended."""

    SIGNALED = "signaled"
    TIMEOUT = "timeout"
    PEER_DEAD = "peer_dead"
    CANCELLED = "cancelled"
    BUS_UNAVAILABLE = "bus_unavailable"
    FAILED = "failed"


class BlockingState(enum.StrEnum):
    """The state recorded in a coordinator's blocking-state hash."""

    WAITING = "waiting"
    SIGNALED = "signaled"
    TIMED_OUT = "timed_out"
    PEER_DEAD = "peer_dead"
    CANCELLED = "cancelled"
    BUS_UNAVAILABLE = "bus_unavailable"
    FAILED = "failed"

    @classmethod
    def after(cls, outcome: Outcome) -> BlockingState:
        return _STATE_AFTER[outcome]


_STATE_AFTER: Final = {
    Outcome.SIGNALED: BlockingState.SIGNALED,
    Outcome.TIMEOUT: BlockingState.TIMED_OUT,
    Outcome.PEER_DEAD: BlockingState.PEER_DEAD,
    Outcome.CANCELLED: BlockingState.CANCELLED,
    Outcome.BUS_UNAVAILABLE: BlockingState.BUS_UNAVAILABLE,
    Outcome.FAILED: BlockingState.FAILED,
}


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every event. ``v`` is the schema version the writer used."""

    v: int = SCHEMA_VERSION


class Signal(Event, tag="signal", frozen=True, kw_only=True):
    """A completion signal published on a channel. ``payload`` is any JSON value."""

    signal_id: str
    swarm: str
    channel: str
    sender: str = ""
    payload: Any = None
    trace: dict[str, str] = {}
    """W3C trace-context carrier of the publisher (``traceparent``/``tracestate``)."""
    key_id: str = ""
    """The signing key's id, when the publisher signed (``streambus.signing``)."""
    sig: str = ""
    """HMAC-SHA256 over (swarm, channel, signal id, sender, payload); ``""`` unsigned."""


class Ack(Event, tag="ack", frozen=True, kw_only=True):
    """A coordinator received a signal. The entry's stream id is the server time of receipt."""

    coordinator: str
    signal_id: str
    channel: str
    stream_id: str
    iteration: int
    key_id: str = ""
    """The signing key's id, when the coordinator signed (``streambus.signing``)."""
    sig: str = ""
    """HMAC-SHA256 over (swarm, channel, signal id, coordinator, stream id, iteration)."""


class Heartbeat(Event, tag="heartbeat", frozen=True, kw_only=True):
    """A coordinator is alive."""

    coordinator: str
    seq: int = 0
    interval_ms: int = 0


class RetryRequest(Event, tag="retry_request", frozen=True, kw_only=True):
    """A validator asks a (blocked) coordinator to redo work."""

    coordinator: str
    request_id: str
    requested_by: str = ""
    reason: str = ""
    blockers: list[str] = []
    payload: Any = None
    iteration: int = 0


class BlockingStarted(Event, tag="blocking_started", frozen=True, kw_only=True):
    """A coordinator began (or, with ``resumed``, re-entered) a blocking wait."""

    coordinator: str
    channel: str
    iteration: int
    started_ms: int
    deadline_ms: int
    resumed: bool = False


class SignalReceived(Event, tag="signal_received", frozen=True, kw_only=True):
    """A waiting coordinator received (and acknowledged) a signal.

    What the ``on_signal_received`` hook gets. The bus no longer appends it to the lifecycle
    stream (``BlockingEnded`` with outcome ``signaled`` carries the same fields, see
    :meth:`BlockingEnded.received`), but entries written by older versions still decode."""

    coordinator: str
    channel: str
    signal_id: str
    stream_id: str
    iteration: int
    started_ms: int = 0
    """When the wait began (server ms; 0 when the writer did not record it)."""


class BlockingEnded(Event, tag="blocking_ended", frozen=True, kw_only=True):
    """A blocking wait ended with an outcome."""

    coordinator: str
    channel: str
    iteration: int
    outcome: Outcome
    signal_id: str = ""
    detail: str = ""
    started_ms: int = 0
    """When the wait began (server ms; 0 when the writer did not record it): the wait lasted
    from here to this entry's stream id."""
    stream_id: str = ""
    """For outcome ``signaled``: the id of the channel entry received (``""`` from writers
    that appended a separate ``SignalReceived``, or for other outcomes)."""

    def received(self) -> SignalReceived | None:
        """The receipt a ``signaled`` end records (what a ``SignalReceived`` said), or ``None``
        (another outcome, or an older writer's end, whose receipt was an event of its own)."""
        if self.outcome != Outcome.SIGNALED or not self.stream_id:
            return None
        return SignalReceived(coordinator=self.coordinator, channel=self.channel,
                              signal_id=self.signal_id, stream_id=self.stream_id,
                              iteration=self.iteration, started_ms=self.started_ms)


class ProgressRecorded(Event, tag="progress", frozen=True, kw_only=True):
    """A coordinator finished one item of a task (recorded once per item)."""

    task: str
    item: str
    coordinator: str
    detail: Any = None


class CoordinatorDead(Event, tag="coordinator_dead", frozen=True, kw_only=True):
    """A watchdog found a coordinator's heartbeats lapsed (all times server ms)."""

    coordinator: str
    last_beat_ms: int
    dead_after_ms: int
    detected_ms: int


AnyEvent = (
    Signal
    | Ack
    | Heartbeat
    | RetryRequest
    | BlockingStarted
    | SignalReceived
    | BlockingEnded
    | CoordinatorDead
    | ProgressRecorded
)

E = TypeVar("E")


class _Envelope(msgspec.Struct):
    """Just the tag of an event, to tell an event of a newer writer from poison."""

    type: str


_encoder: Final = msgspec.json.Encoder()
_envelope: Final = msgspec.json.Decoder(_Envelope)


def encode(event: Event) -> bytes:
    """Encode one event as the bytes stored in an entry's ``e`` field."""
    return _encoder.encode(event)


class EventDecoder(Generic[E]):
    """Decodes the events of one union (the core's, or an application's such as the CFN
    Loop's). One instance per union, reused: building a decoder is the costly part."""

    def __init__(self, union: Any) -> None:
        self._decoder: msgspec.json.Decoder[E] = msgspec.json.Decoder(union)

    def decode(self, raw: bytes) -> E:
        """Decode one encoded event; any failure is a :class:`MalformedEvent`, and a well-formed
        event of a type this union lacks (a newer writer's) an :class:`UnknownEvent`."""
        try:
            return self._decoder.decode(raw)
        except msgspec.DecodeError as exc:
            failure = f"undecodable event: {exc}"
        except RecursionError:
            raise MalformedEvent("undecodable event: nested too deeply") from None
        try:
            tag = _envelope.decode(raw).type
        except (msgspec.DecodeError, RecursionError):
            raise MalformedEvent(failure) from None
        if "`$.type`" in failure:  # the tag is what failed: a type this reader does not know
            raise UnknownEvent(tag)
        raise MalformedEvent(failure)

    def decode_fields(self, fields: dict[bytes, bytes] | None) -> E:
        """Decode a stream entry's field map; a nil body (entry trimmed while pending) is
        poison.

        A pending entry that was deleted comes back with a nil body (redis-py: ``None``, or an
        empty map on some servers); an entry always has at least one field, so both mean "no
        body".
        """
        if not fields:
            raise MalformedEvent("entry has no body (deleted or trimmed while pending)")
        raw = fields.get(FIELD)
        if raw is None:
            raise MalformedEvent(f"entry has no {FIELD.decode()!r} field", fields)
        try:
            return self.decode(raw)
        except UnknownEvent as exc:
            raise UnknownEvent(exc.event_type, fields) from None
        except MalformedEvent as exc:
            raise MalformedEvent(exc.reason, fields) from None


_core: Final[EventDecoder[AnyEvent]] = EventDecoder(AnyEvent)
decode: Final = _core.decode
decode_fields: Final = _core.decode_fields


def stream_id_tuple(stream_id: str) -> tuple[int, int]:
    """A stream id as ``(ms, seq)``, for ordering ids correctly (not as strings)."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def stream_id_ms(stream_id: str) -> int:
    """The server time, in ms since the epoch, encoded in a stream id."""
    return int(stream_id.partition("-")[0])
