"""Loop 3 gates and Loop 2 consensus: the arithmetic, and verdicts carried over the bus.

**Thresholds.** A :class:`Thresholds` holds the Loop 3 gate, the Loop 2 consensus threshold and
the iteration / round limits. Presets: ``mvp`` (0.70 / 0.80), ``standard`` (0.75 / 0.90, the
default) and ``enterprise`` (0.75 / 0.95); all allow 10 iterations and 10 rounds.

**Loop 3 gate.** Passes when there is at least one implementer and *every* implementer's
self-confidence is at or above the gate. One weak implementer holds the whole swarm back: the
validators review all of Loop 3's output, so a gate on the mean would let a bad part through.

**Loop 2 consensus** of round ``r`` over the expected validators ``E`` (non-empty, distinct):

1. Only verdicts with ``round == r`` from validators in ``E`` count; others are ignored.
2. A validator's *first* verdict in the round counts; later ones are ignored. The bus agrees:
   :func:`publish_verdict` derives the signal id from (channel, round, validator), so a second
   publish is a duplicate that is never appended. Re-running a validator is harmless.
3. Each expected validator contributes its confidence if it voted PASS, and 0 if it voted FAIL
   or sent no verdict. ``score = fsum(contributions) / |E|``.
4. The round is ``INCOMPLETE`` when some expected validator sent no verdict (timed out, or
   judged dead: ``missing`` and ``dead`` name them); it is ``PASSED`` when complete, no
   validator voted FAIL, and ``score >= threshold`` (within 1e-9, so that three 0.9s, whose
   float mean is not exactly 0.9, pass a 0.90 threshold); otherwise ``FAILED``.

Why these choices: the denominator is always ``|E|``, so silence can never *raise* a score and
a round cannot pass without every validator. A FAIL vote contributes nothing whatever its
confidence (a confident FAIL is not partial approval) and vetoes the round on its own: consensus
means nobody objects, and with five or more validators a lone FAIL could otherwise be
outvoted. Every outcome is a function of the verdicts alone, never of arrival timing.

``blockers`` is the union of FAIL voters' blockers; ``minor_blockers`` those named only by PASS
voters (the validator passed despite them); ``recommendations`` the union of every counted
verdict's. All are deduplicated, in the order of ``E`` then of each verdict's list, so they do
not depend on which verdict arrived first.

**Below consensus** (:func:`retry_requests_for`): a ``FAILED`` round, or an ``INCOMPLETE`` one
with blockers, becomes one retry request per Loop 3 coordinator carrying every blocker, with a
request id derived from (scope, round, coordinator) so sending them twice appends them once. An
``INCOMPLETE`` round without blockers asks nothing of Loop 3: it needs its validation re-run.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final

import anyio
import msgspec

from streambus.cfn.events import Verdict
from streambus.errors import InvalidId, InvalidInput, MalformedEvent, PeerDead, WaitTimeout
from streambus.keys import validate_id
from streambus.liveness import Liveness
from streambus.retries import RetrySent
from streambus.schema import RetryRequest, Signal, decode_fields, stream_id_tuple

if TYPE_CHECKING:
    from streambus.bus import Bus, Published

log = logging.getLogger(__name__)

EPSILON: Final = 1e-9
"""Tolerance of every threshold comparison: float sums are not exact."""


# -- thresholds --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The Loop 3 gate, the Loop 2 consensus threshold, and how often each loop may run."""

    gate: float
    consensus: float
    max_iterations: int = 10
    max_rounds: int = 10

    PRESETS: ClassVar[Mapping[str, tuple[float, float]]] = {
        "mvp": (0.70, 0.80),
        "standard": (0.75, 0.90),
        "enterprise": (0.75, 0.95),
    }

    def __post_init__(self) -> None:
        _check_unit(self.gate, "gate")
        _check_unit(self.consensus, "consensus threshold")
        if self.consensus <= 0:
            raise InvalidInput("the consensus threshold must be above 0")
        if self.max_iterations < 1 or self.max_rounds < 1:
            raise InvalidInput("max iterations and max rounds must be at least 1")

    @classmethod
    def preset(cls, name: str = "standard") -> Thresholds:
        """The named preset: ``mvp``, ``standard`` or ``enterprise``."""
        try:
            gate, consensus = cls.PRESETS[name]
        except KeyError:
            raise InvalidInput(f"unknown thresholds preset {name!r}: use one of "
                               f"{', '.join(cls.PRESETS)}") from None
        return cls(gate, consensus)


def _check_unit(value: float, what: str) -> float:
    # ``not 0 <= x <= 1`` is also true for NaN, which must not slip through as "in range".
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise InvalidInput(f"{what} must be a number in [0, 1], not {value!r}")
    return float(value)


def at_least(value: float, threshold: float) -> bool:
    """``value >= threshold``, tolerant of float rounding (see :data:`EPSILON`)."""
    return value + EPSILON >= threshold


# -- Loop 3 gate -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GateResult:
    """Whether Loop 3 may hand over to Loop 2, and which implementers are below the gate."""

    gate: float
    passed: bool
    below: tuple[str, ...]
    lowest: float | None


def evaluate_gate(confidences: Mapping[str, float], gate: float) -> GateResult:
    """The Loop 3 gate: passes when every implementer (at least one) is at or above ``gate``."""
    _check_unit(gate, "gate")
    checked = {name: _check_unit(c, f"confidence of implementer {name!r}")
               for name, c in confidences.items()}
    below = tuple(name for name, c in checked.items() if not at_least(c, gate))
    lowest = min(checked.values(), default=None)
    return GateResult(gate, bool(checked) and not below, below, lowest)


# -- Loop 2 consensus --------------------------------------------------------------------------


class RoundStatus(enum.StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    """Every validator voted; a FAIL vote, or the score is below the threshold."""
    INCOMPLETE = "incomplete"
    """Some expected validator sent no verdict (timed out or dead): the round cannot pass."""


@dataclass(frozen=True, slots=True)
class ConsensusResult:
    """The outcome of one Loop 2 round (the rule is in this module's docstring)."""

    round: int
    threshold: float
    score: float
    status: RoundStatus
    votes: tuple[Verdict, ...]
    """The counted verdicts, in the order of the expected validators."""
    missing: tuple[str, ...] = ()
    dead: tuple[str, ...] = ()
    """The missing validators that were judged dead (a subset of ``missing``)."""
    blockers: tuple[str, ...] = ()
    minor_blockers: tuple[str, ...] = ()
    recommendations: tuple[str, ...] = ()
    ignored: int = 0
    """Verdicts not counted: other rounds, unexpected validators, duplicates."""

    @property
    def passed(self) -> bool:
        return self.status is RoundStatus.PASSED

    @property
    def failed_by(self) -> tuple[str, ...]:
        return tuple(v.validator_id for v in self.votes if v.vote == "FAIL")

    def as_dict(self) -> dict[str, Any]:
        return {
            "round": self.round, "threshold": self.threshold, "score": self.score,
            "status": str(self.status), "passed": self.passed,
            "votes": [msgspec.to_builtins(v) for v in self.votes],
            "missing": list(self.missing), "dead": list(self.dead),
            "blockers": list(self.blockers), "minor_blockers": list(self.minor_blockers),
            "recommendations": list(self.recommendations), "ignored": self.ignored,
        }


def evaluate_consensus(
    verdicts: Iterable[Verdict],
    expected: Sequence[str],
    *,
    round: int,
    threshold: float,
    dead: Iterable[str] = (),
) -> ConsensusResult:
    """Loop 2 consensus of ``round``; ``verdicts`` in arrival (stream) order, first one wins.

    ``dead``: validators judged dead; those without a verdict are reported in ``dead`` (a
    verdict that arrived before its validator died still counts).
    """
    validators = _expected(expected)
    _check_unit(threshold, "consensus threshold")
    if threshold <= 0:
        raise InvalidInput("the consensus threshold must be above 0")
    counted: dict[str, Verdict] = {}
    ignored = 0
    for verdict in verdicts:
        if (verdict.round != round or verdict.validator_id not in validators
                or verdict.validator_id in counted):
            ignored += 1
            continue
        _check_unit(verdict.confidence, f"confidence of validator {verdict.validator_id!r}")
        counted[verdict.validator_id] = verdict
    votes = tuple(counted[v] for v in validators if v in counted)
    missing = tuple(v for v in validators if v not in counted)
    known_dead = set(dead)
    score = math.fsum(v.confidence for v in votes if v.vote == "PASS") / len(validators)
    if missing:
        status = RoundStatus.INCOMPLETE
    elif all(v.vote == "PASS" for v in votes) and at_least(score, threshold):
        status = RoundStatus.PASSED
    else:
        status = RoundStatus.FAILED
    blockers = _union(v.blockers for v in votes if v.vote == "FAIL")
    minor = tuple(b for b in _union(v.blockers for v in votes if v.vote == "PASS")
                  if b not in blockers)
    return ConsensusResult(
        round=round, threshold=threshold, score=score, status=status, votes=votes,
        missing=missing, dead=tuple(v for v in missing if v in known_dead), blockers=blockers,
        minor_blockers=minor, recommendations=_union(v.recommendations for v in votes),
        ignored=ignored)


def _expected(expected: Sequence[str]) -> tuple[str, ...]:
    if isinstance(expected, str):
        raise InvalidInput("expected validators must be a sequence of ids, not one string")
    validators = tuple(validate_id(v, "validator id") for v in expected)
    if not validators or len(set(validators)) != len(validators):
        raise InvalidInput("consensus needs one or more distinct expected validators")
    return validators


def _union(lists: Iterable[Iterable[str]]) -> tuple[str, ...]:
    """Deduplicated, first occurrence kept (dict keys keep insertion order)."""
    return tuple(dict.fromkeys(item for items in lists for item in items))


# -- retry requests ----------------------------------------------------------------------------


def stable_id(*parts: str | int) -> str:
    """A deterministic id from ``parts`` (ids or numbers): readable while it fits in 64
    characters, else a readable head and a hash of the whole, so it still never collides."""
    joined = "-".join(str(p) for p in parts)
    try:
        return validate_id(joined)
    except InvalidId:
        digest = hashlib.blake2b(joined.encode(), digest_size=16).hexdigest()
        return validate_id(f"{joined[:31].rstrip('.-_') or 'x'}-{digest}")


def retry_requests_for(
    result: ConsensusResult,
    coordinators: Sequence[str],
    *,
    scope: str,
    requested_by: str = "loop2",
    iteration: int = 0,
) -> list[RetryRequest]:
    """The retry requests a round below consensus sends to the Loop 3 ``coordinators``.

    Every coordinator gets every blocker: a verdict does not say whose work a blocker is in.
    ``scope`` names the phase (e.g. ``"epic-7-auth"``); the request id is
    ``<scope>-r<round>-<coordinator>``, so re-sending a round's requests never duplicates them.
    Empty when the round passed, or is incomplete with no blockers (see the module docstring).
    """
    validate_id(scope, "scope")
    if result.passed or (result.status is RoundStatus.INCOMPLETE and not result.blockers):
        return []
    failed = ", ".join(result.failed_by)
    reason = (f"consensus {result.score:.2f} < {result.threshold:.2f} in round {result.round}"
              + (f" (FAIL: {failed})" if failed else ""))
    payload = {"round": result.round, "score": result.score, "threshold": result.threshold,
               "status": str(result.status), "failed_by": list(result.failed_by),
               "missing": list(result.missing),
               "recommendations": list(result.recommendations)}
    return [RetryRequest(coordinator=validate_id(c, "coordinator id"),
                         request_id=stable_id(scope, f"r{result.round}", c),
                         requested_by=requested_by, reason=reason,
                         blockers=list(result.blockers), payload=payload, iteration=iteration)
            for c in dict.fromkeys(coordinators)]


async def send_retry_requests(bus: Bus, swarm: str, requests: Iterable[RetryRequest], *,
                              wait: float = 0.0) -> list[RetrySent]:
    """Append each request to its coordinator's retry stream (idempotent by request id)."""
    return [await bus.send_retry(swarm, r, wait=wait) for r in requests]


# -- verdicts on the bus -----------------------------------------------------------------------


def verdict_channel(base: str, round: int) -> str:
    """The channel of one round's verdicts, e.g. ``auth-verdicts-r2`` (one channel per round,
    so a collector of round 3 never has to read past rounds 1 and 2)."""
    return validate_id(f"{base}-r{round}", "verdict channel")


def verdict_signal_id(channel: str, verdict: Verdict) -> str:
    """The signal id of ``verdict``: one per (channel, round, validator), so idempotent."""
    return stable_id("verdict", channel, f"r{verdict.round}", verdict.validator_id)


async def publish_verdict(bus: Bus, swarm: str, verdict: Verdict, *, round_channel: str
                          ) -> Published:
    """Publish ``verdict`` as the payload of a signal on ``round_channel``.

    Publishing the same validator's verdict for the same round again is a duplicate: nothing is
    appended and the first verdict stands (``Published.duplicate`` is true).
    """
    validate_id(verdict.validator_id, "validator id")
    return await bus.publish(swarm, round_channel, msgspec.to_builtins(verdict),
                             sender=verdict.validator_id,
                             signal_id=verdict_signal_id(round_channel, verdict))


def verdict_of(signal: Signal) -> Verdict | None:
    """The verdict a signal carries, or ``None`` (logged) when its payload is not one."""
    try:
        return msgspec.convert(signal.payload, Verdict)
    except msgspec.ValidationError as exc:
        log.warning("signal %s on %s carries no verdict: %s", signal.signal_id, signal.channel,
                    exc)
        return None


@dataclass
class _Collected:
    """Verdicts by stream id: a verdict recovered from the log and delivered again is one."""

    by_stream_id: dict[str, Verdict] = field(default_factory=dict)

    def add(self, stream_id: str, verdict: Verdict | None) -> None:
        if verdict is not None:
            self.by_stream_id.setdefault(stream_id, verdict)

    def in_order(self) -> list[Verdict]:
        return [self.by_stream_id[s] for s in sorted(self.by_stream_id, key=stream_id_tuple)]

    def missing(self, expected: Sequence[str], round: int) -> list[str]:
        have = {v.validator_id for v in self.by_stream_id.values() if v.round == round}
        return [v for v in expected if v not in have]


async def collect_verdicts(
    bus: Bus,
    swarm: str,
    coordinator_id: str,
    channel: str,
    expected_validators: Sequence[str],
    *,
    round: int,
    threshold: float,
    timeout: float,
    watch: Sequence[str] = (),
    liveness: Liveness | None = None,
) -> ConsensusResult:
    """Block until every expected validator's verdict for ``round`` is in; return the result.

    Each verdict is one ``Coordinator.wait_for`` on ``channel`` (so each is acknowledged, and
    the blocking view shows the collector waiting). The collection ends early, with an
    ``INCOMPLETE`` result naming the missing validators, when ``timeout`` seconds pass or when
    a ``watch``ed validator that has not answered yet is judged dead (by ``liveness``; the
    watch restarts with each wait, so detection can take ``dead_after`` after the last other
    verdict). Verdicts this collector acknowledged before it restarted are recovered from the
    channel's log, so a restart loses none. Raises what ``wait_for`` raises otherwise
    (:class:`BusUnavailable` past the reconnect budget, cancellation).
    """
    expected = _expected(expected_validators)
    watched = [validate_id(w, "validator id") for w in watch]
    if not set(watched) <= set(expected):
        raise InvalidInput("only expected validators can be watched")
    coordinator = bus.coordinator(swarm, coordinator_id, liveness=liveness)
    collected = await _recovered(bus, swarm, coordinator.id, channel)
    dead: list[str] = []
    deadline = anyio.current_time() + timeout
    while missing := collected.missing(expected, round):
        left = deadline - anyio.current_time()
        if left <= 0:
            break
        try:
            delivery = await coordinator.wait_for(
                channel, timeout=left, watch=[w for w in watched if w in missing])
        except WaitTimeout:
            break
        except PeerDead as exc:
            dead = [v for v in missing if v in exc.peers]
            break
        collected.add(delivery.stream_id, verdict_of(delivery.signal))
    result = evaluate_consensus(collected.in_order(), expected, round=round,
                                threshold=threshold, dead=dead)
    log.info("round %d on %s/%s: %s, score %.3f (missing: %s)", round, swarm, channel,
             result.status, result.score, ", ".join(result.missing) or "none")
    return result


async def _recovered(bus: Bus, swarm: str, coordinator: str, channel: str) -> _Collected:
    """Verdicts on ``channel`` that ``coordinator`` already acknowledged (before a restart):
    its consumer group will not deliver them again. Unacknowledged ones are left to the group,
    so every verdict counted through a wait is also acknowledged."""
    keys = bus.keys(swarm)
    collected = _Collected()
    start = "-"
    while entries := await bus.read_entries(keys.channel(channel), start):
        for stream_id, fields in entries:
            try:
                signal = decode_fields(fields)
            except MalformedEvent:
                continue  # poison: the dispatcher moves it aside when the group reaches it
            if isinstance(signal, Signal) and await bus.ack_id(swarm, signal.signal_id,
                                                               coordinator):
                collected.add(stream_id, verdict_of(signal))
        start = f"({entries[-1][0]}"
    return collected
