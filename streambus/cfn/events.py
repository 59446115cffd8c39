"""The CFN Loop's own events: verdicts, Product Owner decisions and the loop's history.

They follow the schema-evolution rules of :mod:`streambus.schema` and keep the wire tags they
had when they lived in the core. ``EpicStarted`` and ``LoopTransition`` are entries of a swarm's
``loop`` stream (decoded with :data:`decode_fields`); a ``Verdict`` or a
``ProductOwnerDecision`` travels as a signal's payload.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

from streambus.schema import Event, EventDecoder

Confidence = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


class Verdict(Event, tag="verdict", frozen=True, kw_only=True):
    """A Loop 2 validator's verdict."""

    validator_id: str
    validator_type: str
    confidence: Confidence
    vote: Literal["PASS", "FAIL"]
    reasoning: str = ""
    blockers: list[str] = []
    recommendations: list[str] = []
    round: int = 1


class EpicStarted(Event, tag="epic_started", frozen=True, kw_only=True):
    """An epic (Loop 0) began: its phases (Loop 1), in the order they must run."""

    epic: str
    phases: list[str]


class LoopTransition(Event, tag="loop_transition", frozen=True, kw_only=True):
    """A phase of an epic moved from one loop state to the next (see ``streambus.cfn.loop``)."""

    epic: str
    phase: str
    from_state: str
    to_state: str
    iteration: int = 0
    round: int = 0
    reason: str = ""
    detail: Any = None


class ProductOwnerDecision(Event, tag="product_owner_decision", frozen=True, kw_only=True):
    """A Loop 4 Product Owner's decision on a phase (see ``streambus.cfn.decision``)."""

    decision: Literal["PROCEED", "DEFER", "ESCALATE"]
    confidence: Confidence
    reasoning: str = ""
    backlog_items: list[str] = []
    blockers: list[str] = []
    epic: str = ""
    phase: str = ""
    iteration: int = 0
    round: int = 0
    decided_by: str = ""


LoopEvent = EpicStarted | LoopTransition
CfnEvent = Verdict | EpicStarted | LoopTransition | ProductOwnerDecision

_decoder: Final[EventDecoder[CfnEvent]] = EventDecoder(CfnEvent)
decode: Final = _decoder.decode
decode_fields: Final = _decoder.decode_fields
