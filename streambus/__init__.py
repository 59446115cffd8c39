"""streambus: blocking coordination for multi-agent swarms on Redis Streams.

Signals, ACKs and lifecycle events are entries in Redis Streams; every waiting coordinator reads
through its own consumer group, so a signal sent before it started waiting is still delivered,
receipt is provable, and the swarm's state can be rebuilt from the log.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

from streambus._version import __version__
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

if TYPE_CHECKING:
    from streambus.bus import Bus, Published, connect
    from streambus.config import Settings, parse_duration
    from streambus.coordinator import Coordinator, Delivery
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

# The rest of the public API is imported when first used (PEP 562), not with the package: a
# submodule such as ``streambus.cli`` then loads only what it needs, and can prepare the
# import of the Redis client before anything loads it (see ``streambus.cli``).
_LAZY: Final = {
    **dict.fromkeys(("Bus", "Published", "connect"), "streambus.bus"),
    **dict.fromkeys(("Settings", "parse_duration"), "streambus.config"),
    **dict.fromkeys(("Coordinator", "Delivery"), "streambus.coordinator"),
    "Hooks": "streambus.hooks",
    "Lease": "streambus.lease",
    "Liveness": "streambus.liveness",
    **dict.fromkeys(("RetryHandler", "RetrySent"), "streambus.retries"),
    **dict.fromkeys(("Ack", "BlockingEnded", "BlockingStarted", "BlockingState", "Event",
                     "Heartbeat", "Outcome", "RetryRequest", "Signal", "SignalReceived"),
                    "streambus.schema"),
    **dict.fromkeys(("Durability", "Limits", "Script"), "streambus.store"),
    **dict.fromkeys(("CoordinatorStatus", "SwarmSummary"), "streambus.views"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'streambus' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups find it directly
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


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
