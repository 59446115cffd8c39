"""Loop 3 gate and Loop 2 consensus at their edges; verdicts collected over a real server."""

from __future__ import annotations

import math

import anyio
import pytest

from streambus import InvalidInput, Liveness
from streambus.bus import Bus
from streambus.cfn.consensus import (
    ConsensusResult,
    RoundStatus,
    Thresholds,
    collect_verdicts,
    evaluate_consensus,
    evaluate_gate,
    publish_verdict,
    retry_requests_for,
    send_retry_requests,
    stable_id,
    verdict_channel,
    verdict_signal_id,
)
from streambus.cfn.events import Verdict
from streambus.errors import InvalidId
from streambus.schema import RetryRequest, decode_fields
from tests.helpers import until_states

V3 = ("reviewer-1", "security-1", "tester-1")


def verdict(validator: str, confidence: float, vote: str = "PASS", *, round: int = 1,
            blockers: tuple[str, ...] = (), recommendations: tuple[str, ...] = (),
            validator_type: str = "reviewer") -> Verdict:
    return Verdict(validator_id=validator, validator_type=validator_type,
                   confidence=confidence, vote=vote,  # type: ignore[arg-type]
                   blockers=list(blockers), recommendations=list(recommendations), round=round)


def consensus(verdicts: list[Verdict], expected: tuple[str, ...] = V3, *, round: int = 1,
              threshold: float = 0.90, dead: tuple[str, ...] = ()) -> ConsensusResult:
    return evaluate_consensus(verdicts, expected, round=round, threshold=threshold, dead=dead)


# -- thresholds ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "gate", "threshold"), [
    ("mvp", 0.70, 0.80), ("standard", 0.75, 0.90), ("enterprise", 0.75, 0.95)])
def test_presets(name: str, gate: float, threshold: float) -> None:
    assert Thresholds.preset(name) == Thresholds(gate, threshold, 10, 10)


def test_standard_is_the_default_preset() -> None:
    assert Thresholds.preset() == Thresholds.preset("standard")


def test_unknown_preset_is_invalid_input_naming_the_choices() -> None:
    with pytest.raises(InvalidInput, match=r"'strict'.*mvp, standard, enterprise"):
        Thresholds.preset("strict")


@pytest.mark.parametrize("kwargs", [
    {"gate": 1.5, "consensus": 0.9}, {"gate": 0.7, "consensus": 0.0},
    {"gate": math.nan, "consensus": 0.9}, {"gate": 0.7, "consensus": 0.9, "max_rounds": 0},
    {"gate": 0.7, "consensus": 0.9, "max_iterations": 0}])
def test_thresholds_out_of_range_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(InvalidInput):
        Thresholds(**kwargs)  # type: ignore[arg-type]


# -- Loop 3 gate ---------------------------------------------------------------------------------


def test_gate_passes_when_every_implementer_is_at_or_above_it() -> None:
    result = evaluate_gate({"coder-1": 0.75, "coder-2": 0.9, "coder-3": 1.0}, 0.75)
    assert result.passed
    assert result.below == ()
    assert result.lowest == 0.75


def test_gate_fails_on_one_implementer_just_below() -> None:
    result = evaluate_gate({"coder-1": 0.95, "coder-2": 0.7499, "coder-3": 0.99}, 0.75)
    assert not result.passed
    assert result.below == ("coder-2",)


def test_gate_tolerates_float_rounding_at_the_threshold() -> None:
    assert 1 - 0.9 < 0.1  # 0.09999999999999998: mathematically 0.1
    assert evaluate_gate({"coder-1": 1 - 0.9}, 0.1).passed


def test_gate_with_no_implementers_does_not_pass() -> None:
    result = evaluate_gate({}, 0.75)
    assert not result.passed
    assert result.lowest is None


@pytest.mark.parametrize("confidence", [1.01, -0.1, math.nan])
def test_gate_rejects_confidence_outside_zero_to_one(confidence: float) -> None:
    with pytest.raises(InvalidInput, match="coder-2"):
        evaluate_gate({"coder-1": 0.8, "coder-2": confidence}, 0.75)


# -- Loop 2 consensus ----------------------------------------------------------------------------


def test_exact_threshold_passes_despite_float_rounding() -> None:
    verdicts = [verdict("a", 0.95), verdict("b", 0.85)]
    assert math.fsum([0.95, 0.85]) / 2 < 0.90  # 0.8999999999999999
    result = consensus(verdicts, ("a", "b"))
    assert result.status is RoundStatus.PASSED
    assert result.passed
    assert result.score == pytest.approx(0.90)


def test_just_below_threshold_fails() -> None:
    result = consensus([verdict("a", 0.95), verdict("b", 0.849)], ("a", "b"))
    assert result.status is RoundStatus.FAILED
    assert not result.passed
    assert result.score == pytest.approx(0.8995)


def test_a_fail_vote_counts_zero_and_vetoes_even_a_high_score() -> None:
    five = ("a", "b", "c", "d", "e")
    verdicts = [verdict(v, 1.0) for v in five[:4]]
    verdicts.append(verdict("e", 0.9, "FAIL", blockers=("sql injection in login",)))
    result = consensus(verdicts, five, threshold=0.80)
    assert result.score == pytest.approx(0.80)  # at the threshold: only the FAIL vetoes it
    assert result.status is RoundStatus.FAILED
    assert result.failed_by == ("e",)
    assert result.blockers == ("sql injection in login",)


def test_missing_validator_makes_the_round_incomplete_and_counts_zero() -> None:
    result = consensus([verdict("reviewer-1", 1.0), verdict("security-1", 1.0)],
                       threshold=0.60)
    assert result.status is RoundStatus.INCOMPLETE
    assert not result.passed
    assert result.missing == ("tester-1",)
    assert result.dead == ()
    assert result.score == pytest.approx(2 / 3)  # above 0.60, and still not passed


def test_dead_validator_is_named_and_the_outcome_is_deterministic() -> None:
    verdicts = [verdict("reviewer-1", 0.95), verdict("security-1", 0.97)]
    first = consensus(verdicts, dead=("tester-1",))
    again = consensus(list(reversed(verdicts)), dead=("tester-1",))
    assert first.status is RoundStatus.INCOMPLETE
    assert first.missing == first.dead == ("tester-1",)
    assert (first.score, first.status, first.votes) == (again.score, again.status, again.votes)


def test_a_verdict_sent_before_its_validator_died_still_counts() -> None:
    result = consensus([verdict(v, 0.95) for v in V3], dead=("tester-1",))
    assert result.passed
    assert result.dead == ()


def test_duplicate_verdicts_first_one_counts() -> None:
    result = consensus([
        verdict("reviewer-1", 0.95),
        verdict("security-1", 0.95),
        verdict("tester-1", 0.95),
        verdict("tester-1", 0.10, "FAIL", blockers=("changed my mind",)),
    ])
    assert result.passed
    assert result.ignored == 1
    assert result.blockers == ()
    assert [v.vote for v in result.votes] == ["PASS", "PASS", "PASS"]


def test_verdicts_of_other_rounds_and_unexpected_validators_are_ignored() -> None:
    result = consensus([
        verdict("reviewer-1", 0.2, "FAIL", round=1, blockers=("old",)),
        verdict("reviewer-1", 0.95, round=2),
        verdict("security-1", 0.95, round=2),
        verdict("tester-1", 0.95, round=2),
        verdict("intruder", 0.0, "FAIL", round=2, blockers=("noise",)),
        verdict("tester-1", 0.0, "FAIL", round=3),
    ], round=2)
    assert result.passed
    assert result.round == 2
    assert result.ignored == 3
    assert result.blockers == ()


def test_blockers_and_recommendations_are_deduplicated_in_validator_order() -> None:
    arrival = [
        verdict("tester-1", 0.8, "FAIL", blockers=("flaky test", "no tests for logout"),
                recommendations=("add property tests",)),
        verdict("reviewer-1", 0.9, "FAIL", blockers=("no tests for logout", "dead code"),
                recommendations=("split module",)),
        verdict("security-1", 0.95, blockers=("weak hash (minor)",),
                recommendations=("split module", "rotate keys")),
    ]
    result = consensus(arrival)
    assert result.blockers == ("no tests for logout", "dead code", "flaky test")
    assert result.minor_blockers == ("weak hash (minor)",)
    assert result.recommendations == ("split module", "rotate keys", "add property tests")
    assert consensus(list(reversed(arrival))) == result  # arrival order does not matter


@pytest.mark.parametrize("expected", [(), ("a", "a"), "abc"])
def test_expected_validators_must_be_distinct_and_non_empty(expected: tuple[str, ...]) -> None:
    with pytest.raises(InvalidInput):
        consensus([], expected)


def test_verdict_confidence_out_of_range_is_rejected() -> None:
    with pytest.raises(InvalidInput, match="reviewer-1"):
        consensus([verdict("reviewer-1", 1.5)])


# -- retry requests ------------------------------------------------------------------------------


def _failed_round() -> ConsensusResult:
    return consensus([
        verdict("reviewer-1", 0.9, round=2),
        verdict("security-1", 0.8, "FAIL", round=2, blockers=("token in log",)),
        verdict("tester-1", 0.7, "FAIL", round=2, blockers=("login test fails", "token in log")),
    ], round=2)


def test_retry_requests_carry_every_blocker_with_deterministic_ids() -> None:
    requests = retry_requests_for(_failed_round(), ["coord-a", "coord-b", "coord-a"],
                                  scope="epic-7-auth", iteration=3)
    assert [r.request_id for r in requests] == ["epic-7-auth-r2-coord-a", "epic-7-auth-r2-coord-b"]
    assert [r.coordinator for r in requests] == ["coord-a", "coord-b"]
    assert requests[0].blockers == ["token in log", "login test fails"]
    assert requests[0].iteration == 3
    assert "FAIL: security-1, tester-1" in requests[0].reason
    again = retry_requests_for(_failed_round(), ["coord-a", "coord-b"], scope="epic-7-auth",
                               iteration=3)
    assert again == requests


def test_a_low_scoring_round_without_blockers_still_asks_for_a_retry() -> None:
    result = consensus([verdict(v, 0.8) for v in V3])
    [request] = retry_requests_for(result, ["coord-a"], scope="s")
    assert request.blockers == []
    assert "consensus 0.80 < 0.90 in round 1" in request.reason


def test_no_retry_requests_when_passed_or_only_validators_are_missing() -> None:
    passed = consensus([verdict(v, 0.95) for v in V3])
    silent = consensus([verdict("reviewer-1", 0.95)], dead=("tester-1",))
    assert retry_requests_for(passed, ["coord-a"], scope="s") == []
    assert retry_requests_for(silent, ["coord-a"], scope="s") == []
    blocked = consensus([verdict("reviewer-1", 0.9, "FAIL", blockers=("x",))])
    assert [r.blockers for r in retry_requests_for(blocked, ["coord-a"], scope="s")] == [["x"]]


def test_long_ids_are_hashed_stably_and_stay_valid() -> None:
    scope = "e" * 60
    first = stable_id(scope, "r1", "coord-a")
    assert len(first) <= 64
    assert first == stable_id(scope, "r1", "coord-a")
    assert first != stable_id(scope, "r1", "coord-b")
    assert stable_id("short", 1) == "short-1"
    with pytest.raises(InvalidId):
        retry_requests_for(_failed_round(), ["coord-a"], scope="bad scope")


def test_verdict_signal_ids_are_one_per_channel_round_and_validator() -> None:
    ids = {verdict_signal_id(ch, verdict(v, 0.9, round=r))
           for ch in ("auth-verdicts-r1", "auth-verdicts-r2") for r in (1, 2) for v in V3}
    assert len(ids) == 12
    assert verdict_channel("auth-verdicts", 2) == "auth-verdicts-r2"


# -- on a real server ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_collect_verdicts_from_three_validators(bus: Bus) -> None:
    channel = verdict_channel("auth-verdicts", 1)
    results: list[ConsensusResult] = []

    async def collect() -> None:
        results.append(await collect_verdicts(bus, "cv", "loop2", channel, V3, round=1,
                                              threshold=0.90, timeout=20))

    # One verdict before the collector waits: the channel is a log, it is not lost.
    await publish_verdict(bus, "cv", verdict("reviewer-1", 0.92), round_channel=channel)
    async with anyio.create_task_group() as tg:
        tg.start_soon(collect)
        await until_states(bus, "cv", {"loop2": "waiting"})
        stale = verdict("security-1", 0.1, "FAIL", round=0, blockers=("stale",))
        await publish_verdict(bus, "cv", stale, round_channel=channel)
        await publish_verdict(bus, "cv", verdict("security-1", 0.95), round_channel=channel)
        dup = await publish_verdict(bus, "cv", verdict("security-1", 0.2, "FAIL"),
                                    round_channel=channel)
        await publish_verdict(bus, "cv", verdict("tester-1", 0.91,
                                                 recommendations=("more tests",)),
                              round_channel=channel)
    [result] = results
    assert dup.duplicate
    assert result.status is RoundStatus.PASSED
    assert [v.validator_id for v in result.votes] == list(V3)
    assert result.score == pytest.approx((0.92 + 0.95 + 0.91) / 3)
    assert result.recommendations == ("more tests",)
    assert result.ignored == 1  # the round-0 verdict; the duplicate was never appended
    entries = await bus._store.read_range(bus.keys("cv").channel(channel))
    assert len(entries) == 4
    for _, fields in entries:  # the collector acknowledged every verdict it counted
        signal = decode_fields(fields)
        assert await bus._store.ack_id(bus.keys("cv"), signal.signal_id, "loop2")  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_a_silent_validator_ends_the_round_incomplete_at_the_timeout(bus: Bus) -> None:
    channel = verdict_channel("v", 1)
    await publish_verdict(bus, "cs", verdict("reviewer-1", 0.9, "FAIL", blockers=("bug",)),
                          round_channel=channel)
    await publish_verdict(bus, "cs", verdict("security-1", 0.95), round_channel=channel)
    started = anyio.current_time()
    result = await collect_verdicts(bus, "cs", "loop2", channel, V3, round=1, threshold=0.9,
                                    timeout=1.0)
    elapsed = anyio.current_time() - started
    assert 0.9 <= elapsed < 3.0
    assert result.status is RoundStatus.INCOMPLETE
    assert result.missing == ("tester-1",)
    assert result.dead == ()
    requests = retry_requests_for(result, ["coord-a", "coord-b"], scope="cs-p1")
    sent = await send_retry_requests(bus, "cs", requests)
    resent = await send_retry_requests(bus, "cs", requests)
    assert [s.duplicate for s in sent + resent] == [False, False, True, True]
    stored = await bus._store.read_range(bus.keys("cs").retries("coord-a"))
    [request] = [decode_fields(f) for _, f in stored]
    assert isinstance(request, RetryRequest)
    assert request.blockers == ["bug"]


@pytest.mark.anyio
async def test_a_watched_validator_that_is_dead_ends_the_round_early(bus: Bus) -> None:
    channel = verdict_channel("v", 1)
    fast = Liveness(heartbeat_interval=0.2, dead_after=0.5, stale_checks=2)
    for validator in V3[:2]:
        await publish_verdict(bus, "cd", verdict(validator, 0.95), round_channel=channel)
    started = anyio.current_time()
    # tester-1 never beats and never answers: judged dead well before the 20 s timeout.
    result = await collect_verdicts(bus, "cd", "loop2", channel, V3, round=1, threshold=0.9,
                                    timeout=20, watch=V3, liveness=fast)
    assert anyio.current_time() - started < 5
    assert result.status is RoundStatus.INCOMPLETE
    assert result.missing == result.dead == ("tester-1",)
    assert [v.validator_id for v in result.votes] == list(V3[:2])
    rows = {r.coordinator: r for r in await bus.status("cd")}
    assert rows["loop2"].state == "peer_dead"


@pytest.mark.anyio
async def test_a_restarted_collector_recovers_the_verdicts_it_already_acknowledged(
    bus: Bus,
) -> None:
    channel = verdict_channel("v", 1)
    for validator in V3[:2]:
        await publish_verdict(bus, "cr", verdict(validator, 0.95), round_channel=channel)
    first = await collect_verdicts(bus, "cr", "loop2", channel, V3, round=1, threshold=0.9,
                                   timeout=0.5)
    assert first.missing == ("tester-1",)  # consumed and acknowledged two verdicts
    await publish_verdict(bus, "cr", verdict("tester-1", 0.95), round_channel=channel)
    second = await collect_verdicts(bus, "cr", "loop2", channel, V3, round=1, threshold=0.9,
                                    timeout=10)
    assert second.passed
    assert [v.validator_id for v in second.votes] == list(V3)


@pytest.mark.anyio
async def test_collect_rejects_watching_an_unexpected_peer(bus: Bus) -> None:
    with pytest.raises(InvalidInput):
        await collect_verdicts(bus, "cx", "loop2", "v-r1", V3, round=1, threshold=0.9,
                               timeout=1, watch=["someone-else"])
