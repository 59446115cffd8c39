"""Loop 4: the default Product Owner's rule at its edges, the decision event, the bus helper."""

from __future__ import annotations

import anyio
import msgspec
import pytest

from streambus import InvalidInput
from streambus.bus import Bus
from streambus.cfn.consensus import ConsensusResult, Thresholds, evaluate_consensus
from streambus.cfn.decision import (
    Decider,
    Decision,
    DecisionContext,
    DecisionKind,
    DefaultDecider,
    decision_of,
    publish_decision,
)
from streambus.cfn.events import ProductOwnerDecision, Verdict, decode
from streambus.schema import encode

V3 = ("reviewer-1", "security-1", "tester-1")
DECIDER = DefaultDecider()


def result(*confidences: float, round: int = 1, fail: str = "", blockers: tuple[str, ...] = (),
           minor: tuple[str, ...] = (), recommendations: tuple[str, ...] = (),
           dead: tuple[str, ...] = ()) -> ConsensusResult:
    """A round of V3 (as many as ``confidences``); ``fail`` names a FAIL voter."""
    verdicts = [
        Verdict(validator_id=v, validator_type="reviewer", confidence=c,
                vote="FAIL" if v == fail else "PASS",
                blockers=list(blockers if v == fail else minor if i == 0 else ()),
                recommendations=list(recommendations if i == 0 else ()), round=round)
        for i, (v, c) in enumerate(zip(V3, confidences, strict=False))]
    return evaluate_consensus(verdicts, V3, round=round, threshold=0.90, dead=dead)


def decide(consensus: ConsensusResult, iteration: int = 1, **more: object) -> Decision:
    return DECIDER.rule(DecisionContext(consensus, iteration, **more))  # type: ignore[arg-type]


def test_proceed_when_consensus_passed_and_nothing_is_open() -> None:
    decision = decide(result(0.95, 0.95, 0.92))
    assert decision.decision is DecisionKind.PROCEED
    assert decision.confidence == pytest.approx((0.95 + 0.95 + 0.92) / 3)
    assert decision.backlog_items == decision.blockers == ()
    assert decision.approved


def test_proceed_at_the_exact_threshold_and_on_the_last_allowed_round() -> None:
    decision = decide(result(0.9, 0.9, 0.9, round=10), iteration=10)
    assert decision.decision is DecisionKind.PROCEED


def test_defer_puts_minor_blockers_recommendations_and_known_items_on_the_backlog() -> None:
    consensus = result(0.95, 0.95, 0.95, minor=("slow query",),
                       recommendations=("add an index", "slow query"))
    decision = decide(consensus, backlog=("SSO support (out of scope)",))
    assert decision.decision is DecisionKind.DEFER
    assert decision.backlog_items == ("slow query", "add an index", "SSO support (out of scope)")
    assert decision.approved
    assert decision.confidence == pytest.approx(0.95)


def test_defer_on_recommendations_alone() -> None:
    decision = decide(result(0.95, 0.95, 0.95, recommendations=("rename module",)))
    assert decision.decision is DecisionKind.DEFER
    assert decision.backlog_items == ("rename module",)


@pytest.mark.parametrize("marked", ["critical: token logged", "  [CRITICAL] token logged",
                                    "Critical: token logged"])
def test_a_critical_blocker_escalates_even_a_passed_round(marked: str) -> None:
    decision = decide(result(0.99, 0.99, 0.99, minor=(marked, "typo")))
    assert decision.decision is DecisionKind.ESCALATE
    assert decision.confidence == 1.0
    assert decision.blockers == (marked, "typo")
    assert not decision.approved


def test_a_blocker_merely_mentioning_critical_is_not_critical() -> None:
    decision = decide(result(0.99, 0.99, 0.99, minor=("not critical: wording",)))
    assert decision.decision is DecisionKind.DEFER


def test_explicit_open_blockers_replace_the_rounds() -> None:
    consensus = result(0.99, 0.99, 0.99, minor=("typo",))
    assert decide(consensus, open_blockers=()).decision is DecisionKind.PROCEED
    escalated = decide(consensus, open_blockers=("critical: data loss",))
    assert escalated.decision is DecisionKind.ESCALATE


def test_escalate_when_consensus_failed_after_max_rounds() -> None:
    consensus = result(0.9, 0.9, 0.3, fail="tester-1", blockers=("login broken",), round=10)
    decision = decide(consensus, iteration=4)
    assert decision.decision is DecisionKind.ESCALATE
    assert decision.confidence == 1.0
    assert decision.blockers == ("login broken",)
    assert "round 10/10" in decision.reasoning


def test_escalate_when_iterations_are_exhausted() -> None:
    consensus = result(0.9, 0.9, 0.8, round=2)
    limits = Thresholds(0.75, 0.90, max_iterations=5, max_rounds=10)
    decision = decide(consensus, iteration=5, thresholds=limits)
    assert decision.decision is DecisionKind.ESCALATE
    assert "iteration 5/5" in decision.reasoning
    assert decide(consensus, iteration=4, thresholds=limits).confidence < 1.0


def test_a_failed_round_with_budget_left_is_never_approved() -> None:
    consensus = result(0.9, 0.9, 0.6, round=2)
    decision = decide(consensus, iteration=2)
    assert decision.decision is DecisionKind.ESCALATE
    assert decision.confidence == pytest.approx(1 - consensus.score)
    assert "should retry" in decision.reasoning


def test_escalation_names_silent_and_dead_validators() -> None:
    consensus = result(0.95, round=10, dead=("tester-1",))
    decision = decide(consensus, iteration=3)
    assert decision.decision is DecisionKind.ESCALATE
    assert decision.blockers == ("validator security-1 sent no verdict",
                                 "validator tester-1 is dead")


@pytest.mark.anyio
async def test_the_default_decider_fits_the_protocol() -> None:
    decider: Decider = DECIDER
    context = DecisionContext(result(0.95, 0.95, 0.95), 1)
    assert await decider.decide(context) == DECIDER.rule(context)


def test_decision_rejects_a_confidence_outside_zero_to_one() -> None:
    with pytest.raises(InvalidInput):
        Decision(DecisionKind.PROCEED, 1.2)
    assert Decision("DEFER", 0.5).decision is DecisionKind.DEFER  # type: ignore[arg-type]


def test_decision_event_round_trips_and_decodes_a_hand_written_v1_entry() -> None:
    decision = Decision(DecisionKind.DEFER, 0.93, "ok", ("later",), ())
    event = decision.to_event(epic="epic-7", phase="auth", iteration=2, round=3,
                              decided_by="po")
    assert decode(encode(event)) == event
    assert Decision.from_event(event) == decision
    raw = (b'{"type":"product_owner_decision","v":1,"decision":"ESCALATE","confidence":1.0,'
           b'"reasoning":"critical","blockers":["critical: x"],"added_later":[1]}')
    decoded = decode(raw)
    assert isinstance(decoded, ProductOwnerDecision)
    assert (decoded.decision, decoded.blockers, decoded.backlog_items, decoded.phase) == (
        "ESCALATE", ["critical: x"], [], "")


@pytest.mark.anyio
async def test_a_published_decision_reaches_a_blocked_coordinator_once(bus: Bus) -> None:
    decision = decide(result(0.95, 0.95, 0.95, recommendations=("docs",)))
    got: list[ProductOwnerDecision | None] = []

    async def coordinator() -> None:
        delivery = await bus.wait_for("po", "coord-a", "auth-decision", timeout=10)
        got.append(decision_of(delivery.signal))

    async with anyio.create_task_group() as tg:
        tg.start_soon(coordinator)
        first = await publish_decision(bus, "po", decision, channel="auth-decision",
                                       phase="auth", round=1, iteration=1)
        again = await publish_decision(bus, "po", decision, channel="auth-decision",
                                       phase="auth", round=1, iteration=1)
    assert not first.duplicate
    assert again.duplicate
    [event] = got
    assert event is not None
    assert Decision.from_event(event) == decision
    assert (event.epic, event.phase, event.round, event.decided_by) == (
        "po", "auth", 1, "product-owner")
    assert msgspec.structs.asdict(event)["decision"] == "DEFER"
