"""streambus: blocking coordination for multi-agent swarms on Redis Streams.

Signals, ACKs and lifecycle events are entries in Redis Streams; every waiting coordinator reads
through its own consumer group, so a signal sent before it started waiting is still delivered,
receipt is provable, and the swarm's state can be rebuilt from the log.
"""

from streambus.bus import Bus, Delivery, Published, connect
from streambus.config import Settings, parse_duration
from streambus.coordinator import Coordinator
from streambus.errors import (
    AckTimeout,
    Backpressure,
    BusUnavailable,
    DurabilityNotReached,
    EmbeddedServerError,
    InvalidId,
    InvalidInput,
    MalformedEvent,
    PayloadTooLarge,
    PeerDead,
    StreambusError,
    WaitTimeout,
)
from streambus.liveness import Liveness
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
    "Backpressure",
    "BlockingEnded",
    "BlockingStarted",
    "BlockingState",
    "Bus",
    "BusUnavailable",
    "Coordinator",
    "Delivery",
    "DurabilityNotReached",
    "EmbeddedServerError",
    "Event",
    "Heartbeat",
    "InvalidId",
    "InvalidInput",
    "Liveness",
    "MalformedEvent",
    "Outcome",
    "PayloadTooLarge",
    "PeerDead",
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
