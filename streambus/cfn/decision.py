"""Loop 4: the Product Owner decides PROCEED, DEFER or ESCALATE once Loop 2 has spoken.

The decider is pluggable (:class:`Decider`: an object with ``async decide(context)``, so a
model-backed Product Owner fits as well as a rule). :class:`DefaultDecider` is deterministic;
its rule, first match wins:

1. **ESCALATE** (confidence 1.0) when any open blocker is *critical*: it starts with
   ``critical:`` or ``[critical]`` (case-insensitive). Validators mark what a human must see,
   and no score outweighs it, not even a passed round.
2. Consensus **passed**:
   - **PROCEED** (confidence = the consensus score) when nothing is left open: no minor
     blockers, no recommendations, no known backlog items;
   - otherwise **DEFER** (confidence = the score): approve, and put the minor blockers (named by
     validators who voted PASS anyway), the recommendations and the known backlog items on the
     backlog, deduplicated, in that order. The work is accepted; nothing is lost.
3. Consensus **not passed**: **ESCALATE**. With the rounds (``round >= max_rounds``) or
   iterations (``iteration >= max_iterations``) exhausted the confidence is 1.0: the loop has no
   move left. With budget left the loop should have run another Loop 3 iteration instead of
   asking; the decider still never approves unvalidated work, and its confidence is
   ``1 - score`` (how far the work is from validated), with the reasoning saying so.

An ESCALATE's ``blockers`` are the open blockers, plus one line per validator that sent no
verdict (``validator X sent no verdict`` / ``validator X is dead``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgspec

from streambus.cfn.consensus import ConsensusResult, Thresholds, stable_id
from streambus.cfn.events import ProductOwnerDecision
from streambus.errors import InvalidInput
from streambus.keys import validate_id
from streambus.schema import Signal

if TYPE_CHECKING:
    from streambus.bus import Bus, Published

CRITICAL_MARKERS: Final = ("critical:", "[critical]")


class DecisionKind(enum.StrEnum):
    PROCEED = "PROCEED"
    """Accept the phase; the next one may start."""
    DEFER = "DEFER"
    """Accept the phase; out-of-scope items and leftovers go to the backlog."""
    ESCALATE = "ESCALATE"
    """A human must decide."""


@dataclass(frozen=True, slots=True)
class Decision:
    """A Product Owner's decision."""

    decision: DecisionKind
    confidence: float
    reasoning: str = ""
    backlog_items: tuple[str, ...] = ()
    blockers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.confidence <= 1:
            raise InvalidInput(f"decision confidence must be in [0, 1], not {self.confidence!r}")
        object.__setattr__(self, "decision", DecisionKind(self.decision))

    @property
    def approved(self) -> bool:
        return self.decision is not DecisionKind.ESCALATE

    def to_event(self, *, epic: str = "", phase: str = "", iteration: int = 0, round: int = 0,
                 decided_by: str = "") -> ProductOwnerDecision:
        return ProductOwnerDecision(
            decision=self.decision.value, confidence=self.confidence, reasoning=self.reasoning,
            backlog_items=list(self.backlog_items), blockers=list(self.blockers), epic=epic,
            phase=phase, iteration=iteration, round=round, decided_by=decided_by)

    @classmethod
    def from_event(cls, event: ProductOwnerDecision) -> Decision:
        return cls(DecisionKind(event.decision), event.confidence, event.reasoning,
                   tuple(event.backlog_items), tuple(event.blockers))


@dataclass(frozen=True, slots=True)
class DecisionContext:
    """What the Product Owner knows when it decides."""

    consensus: ConsensusResult
    """The last Loop 2 round."""
    iteration: int
    """Loop 3 iterations run so far (1 after the first)."""
    thresholds: Thresholds = field(default_factory=Thresholds.preset)
    open_blockers: tuple[str, ...] | None = None
    """Blockers still open; by default the round's blockers and minor blockers."""
    backlog: tuple[str, ...] = ()
    """Out-of-scope items already known (e.g. reported by implementers)."""

    def __post_init__(self) -> None:
        if self.iteration < 0:
            raise InvalidInput(f"iteration must not be negative, not {self.iteration}")

    @property
    def blockers(self) -> tuple[str, ...]:
        if self.open_blockers is not None:
            return self.open_blockers
        return self.consensus.blockers + self.consensus.minor_blockers

    @property
    def limits_exhausted(self) -> bool:
        return (self.consensus.round >= self.thresholds.max_rounds
                or self.iteration >= self.thresholds.max_iterations)


class Decider(Protocol):
    """A Loop 4 Product Owner."""

    async def decide(self, context: DecisionContext) -> Decision: ...


class DefaultDecider:
    """The deterministic Product Owner (the rule is in this module's docstring)."""

    def __init__(self, critical_markers: Sequence[str] = CRITICAL_MARKERS) -> None:
        self.critical_markers = tuple(m.lower() for m in critical_markers)

    def __repr__(self) -> str:
        return f"<DefaultDecider critical_markers={self.critical_markers}>"

    async def decide(self, context: DecisionContext) -> Decision:
        return self.rule(context)

    def is_critical(self, blocker: str) -> bool:
        return blocker.strip().lower().startswith(self.critical_markers)

    def rule(self, context: DecisionContext) -> Decision:
        """The decision, as a plain function of ``context``."""
        result = context.consensus
        open_blockers = _unique(context.blockers)
        critical = tuple(b for b in open_blockers if self.is_critical(b))
        if critical:
            return Decision(DecisionKind.ESCALATE, 1.0,
                            f"critical blockers need a human: {'; '.join(critical)}",
                            blockers=_unique([*critical, *open_blockers, *_silent(result)]))
        if result.passed:
            return _approve(context, open_blockers)
        return _escalate_failed(context, open_blockers)


def _approve(context: DecisionContext, open_blockers: tuple[str, ...]) -> Decision:
    result = context.consensus
    backlog = _unique([*open_blockers, *result.recommendations, *context.backlog])
    if not backlog:
        return Decision(DecisionKind.PROCEED, result.score,
                        f"consensus {result.score:.2f} >= {result.threshold:.2f} in round "
                        f"{result.round} after {context.iteration} iteration(s), nothing open")
    return Decision(DecisionKind.DEFER, result.score,
                    f"consensus {result.score:.2f} >= {result.threshold:.2f} in round "
                    f"{result.round}; {len(backlog)} item(s) deferred to the backlog",
                    backlog_items=backlog)


def _escalate_failed(context: DecisionContext, open_blockers: tuple[str, ...]) -> Decision:
    result = context.consensus
    limits = context.thresholds
    blockers = _unique([*open_blockers, *_silent(result)])
    below = (f"consensus {result.score:.2f} < {result.threshold:.2f} in round {result.round} "
             f"({result.status})")
    if context.limits_exhausted:
        return Decision(DecisionKind.ESCALATE, 1.0,
                        f"{below} with the limits reached (round {result.round}/"
                        f"{limits.max_rounds}, iteration {context.iteration}/"
                        f"{limits.max_iterations})", blockers=blockers)
    return Decision(DecisionKind.ESCALATE, round(max(0.0, 1.0 - result.score), 9),
                    f"{below} with rounds left: the loop should retry; unvalidated work is "
                    "never approved", blockers=blockers)


def _silent(result: ConsensusResult) -> list[str]:
    return [f"validator {v} is dead" if v in result.dead else f"validator {v} sent no verdict"
            for v in result.missing]


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


# -- on the bus --------------------------------------------------------------------------------


async def publish_decision(
    bus: Bus,
    swarm: str,
    decision: Decision,
    *,
    channel: str,
    phase: str,
    round: int,
    iteration: int = 0,
    decided_by: str = "product-owner",
) -> Published:
    """Publish ``decision`` as the payload of a signal on ``channel`` (the Loop 3 coordinators
    block on it). One decision per (channel, round): publishing again is a duplicate."""
    validate_id(phase, "phase id")
    event = decision.to_event(epic=swarm, phase=phase, iteration=iteration, round=round,
                              decided_by=decided_by)
    return await bus.publish(swarm, channel, msgspec.to_builtins(event),
                             sender=validate_id(decided_by, "sender id"),
                             signal_id=stable_id("decision", channel, f"r{round}"))


def decision_of(signal: Signal) -> ProductOwnerDecision | None:
    """The decision a signal carries, or ``None`` when its payload is not one."""
    payload: Any = signal.payload
    try:
        return msgspec.convert(payload, ProductOwnerDecision)
    except msgspec.ValidationError:
        return None
