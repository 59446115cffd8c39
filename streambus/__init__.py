"""streambus: blocking coordination for multi-agent swarms on Redis Streams.

Signals, ACKs and lifecycle events are entries in Redis Streams; every waiting coordinator reads
through its own consumer group, so a signal sent before it started waiting is still delivered,
receipt is provable, and the swarm's state can be rebuilt from the log.
"""

from streambus.bus import Bus, Coordinator, Delivery, Published, connect
from streambus.config import Settings, parse_duration
from streambus.errors import (
    AckTimeout,
    BusUnavailable,
    EmbeddedServerError,
    InvalidId,
    InvalidInput,
    MalformedEvent,
    PayloadTooLarge,
    StreambusError,
    WaitTimeout,
)
from streambus.schema import (
    Ack,
    BlockingEnded,
    BlockingStarted,
    BlockingState,
    Event,
    Heartbeat,
    Outcome,
    RetryRequest,
    Signal,
    SignalReceived,
    Verdict,
)

__version__ = "0.1.0"

__all__ = [
    "Ack",
    "AckTimeout",
    "BlockingEnded",
    "BlockingStarted",
    "BlockingState",
    "Bus",
    "BusUnavailable",
    "Coordinator",
    "Delivery",
    "EmbeddedServerError",
    "Event",
    "Heartbeat",
    "InvalidId",
    "InvalidInput",
    "MalformedEvent",
    "Outcome",
    "PayloadTooLarge",
    "Published",
    "RetryRequest",
    "Settings",
    "Signal",
    "SignalReceived",
    "StreambusError",
    "Verdict",
    "WaitTimeout",
    "__version__",
    "connect",
    "parse_duration",
]
