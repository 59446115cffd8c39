"""streambus: blocking coordination for multi-agent swarms on Redis Streams.

Signals, ACKs and lifecycle events are entries in Redis Streams; every waiting coordinator reads
through its own consumer group, so a signal sent before it started waiting is still delivered,
receipt is provable, and the swarm's state can be rebuilt from the log.
"""

from streambus._version import __version__
from streambus.bus import Bus, Published, connect
from streambus.config import Settings, parse_duration
from streambus.coordinator import Coordinator, Delivery
from streambus.errors import (
    AckTimeout,
    Backpressure,
    BusUnavailable,
    CertificateRejected,
    DurabilityNotReached,
    DurabilityUnsupported,
    EmbeddedServerError,
    InvalidId,
    InvalidInput,
    LeaseLost,
    MalformedEvent,
    NotPermitted,
    PayloadTooLarge,
    PeerDead,
    StreambusError,
    UnknownEvent,
    WaitTimeout,
)
from streambus.hooks import Hooks
from streambus.lease import Lease
from streambus.liveness import Liveness
from streambus.retries import RetryHandler, RetrySent
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
)
from streambus.store import Durability, Limits, Script
from streambus.views import CoordinatorStatus, SwarmSummary

__all__ = [
    "Ack",
    "AckTimeout",
    "Backpressure",
    "BlockingEnded",
    "BlockingStarted",
    "BlockingState",
    "Bus",
    "BusUnavailable",
    "CertificateRejected",
    "Coordinator",
    "CoordinatorStatus",
    "Delivery",
    "Durability",
    "DurabilityNotReached",
    "DurabilityUnsupported",
    "EmbeddedServerError",
    "Event",
    "Heartbeat",
    "Hooks",
    "InvalidId",
    "InvalidInput",
    "Lease",
    "LeaseLost",
    "Limits",
    "Liveness",
    "MalformedEvent",
    "NotPermitted",
    "Outcome",
    "PayloadTooLarge",
    "PeerDead",
    "Published",
    "RetryHandler",
    "RetryRequest",
    "RetrySent",
    "Script",
    "Settings",
    "Signal",
    "SignalReceived",
    "StreambusError",
    "SwarmSummary",
    "UnknownEvent",
    "WaitTimeout",
    "__version__",
    "connect",
    "parse_duration",
]
