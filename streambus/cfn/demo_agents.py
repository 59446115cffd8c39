"""The agents of ``streambus demo``, each a real process: Loop 3 coordinators and validators.

    python -m streambus.cfn.demo_agents coordinator --swarm S --phase P --id coordinator-a ...
    python -m streambus.cfn.demo_agents validator --swarm S --phase P --id validator-1 ...

They find the bus through ``STREAMBUS_REDIS_URL`` / ``STREAMBUS_NAMESPACE`` (the demo sets
both), print one JSON line when they are done and exit 0 (2 on a timeout, 3 when the demo's
orchestrator stopped beating, 128+N on signal N).

**A coordinator** runs its simulated implementers (each reports a self-confidence; one below
the Loop 3 gate redoes its part), reports ``gate passed`` on the phase's ``loop3`` channel, then
blocks on ``loop2-done`` with heartbeats, watching the orchestrator. Retry requests it receives
while blocked are Loop 3 iterations: its implementers address the blockers (their confidence
rises) and it reports again, still blocked. When Loop 2 is done it waits for the Product
Owner's decision and exits.

**A validator** blocks on the phase's ``review`` channel; for each review request (one per Loop
2 round) it publishes a verdict on that round's verdict channel; a ``close`` request ends it.

Everything random is drawn from ``random.Random`` seeded with the demo's seed and the names of
what is drawn (phase, agent, iteration or round), so a seed reproduces every confidence, vote
and blocker, whatever the timing.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import anyio
import msgspec

from streambus.bus import Bus, connect
from streambus.cfn.consensus import (
    Thresholds,
    evaluate_gate,
    publish_verdict,
    stable_id,
    verdict_channel,
)
from streambus.cfn.events import Verdict
from streambus.errors import PeerDead, StreambusError, WaitTimeout
from streambus.liveness import Liveness
from streambus.process import run_interruptible
from streambus.schema import RetryRequest

SCENARIOS: Final = ("standard", "clean", "escalate")
ORCHESTRATOR: Final = "loop2"
"""The demo process's coordinator id: it collects Loop 3 reports and Loop 2 verdicts."""
IMPLEMENTERS: Final = 4
"""Simulated implementers per Loop 3 coordinator."""
VALIDATOR_TYPES: Final = ("reviewer", "security-specialist", "tester", "analyst")
LIVENESS: Final = Liveness(heartbeat_interval=1.0, dead_after=10.0)
"""Every demo agent beats each second; a peer silent for 10 s (server time) is dead."""

_BLOCKERS: Final = {
    "authentication": ["auth/tokens.py: refresh tokens never expire",
                       "auth/login.py: no rate limit on failed logins",
                       "tests: session fixation case is not covered",
                       "auth/password.py: bcrypt cost factor below 12"],
    "authorization": ["authz/policy.py: deny rules evaluated after allow rules",
                      "api/admin.py: no role check on DELETE /users",
                      "tests: group inheritance of permissions is not covered",
                      "authz/cache.py: revoked roles stay cached for an hour"],
}
_RECOMMENDATIONS: Final = ["add an audit log entry per decision", "document the token lifetime",
                           "add a metric for denied requests", "split the policy module"]
_MINOR: Final = ["rename helper check() to is_allowed()", "a TODO left in the error handler"]


def rng(seed: int, *parts: object) -> random.Random:
    """A generator for one named draw (str seeds hash with SHA-512: stable across runs)."""
    return random.Random("/".join(str(p) for p in (seed, *parts)))


@dataclass(frozen=True, slots=True)
class PhaseChannels:
    """The channels of one phase of the demo epic."""

    phase: str

    @property
    def loop3(self) -> str:
        return f"{self.phase}-loop3"

    @property
    def review(self) -> str:
        return f"{self.phase}-review"

    def verdicts(self, round: int) -> str:
        return verdict_channel(f"{self.phase}-verdicts", round)

    @property
    def loop2_done(self) -> str:
        return f"{self.phase}-loop2-done"

    @property
    def decision(self) -> str:
        return f"{self.phase}-decision"


# -- the scenario: what implementers and validators report -------------------------------------


class Implementers:
    """One coordinator's simulated implementers and their self-confidence."""

    def __init__(self, seed: int, phase: str, coordinator: str, thresholds: Thresholds) -> None:
        self.seed, self.phase, self.coordinator = seed, phase, coordinator
        self.thresholds = thresholds
        draw = rng(seed, phase, coordinator, "start")
        self.confidence = {f"{coordinator}.impl-{i + 1}": round(draw.uniform(0.62, 0.93), 3)
                           for i in range(IMPLEMENTERS)}

    def iterate(self, iteration: int, blockers: Sequence[str] = ()) -> tuple[dict[str, Any],
                                                                              list[float]]:
        """Run Loop 3 iteration ``iteration`` until the gate passes (or the limit); return the
        report and how long each gate attempt's work takes (the slowest implementer)."""
        draw = rng(self.seed, self.phase, self.coordinator, f"i{iteration}")
        if iteration > 1:  # a retry: every implementer works on the blockers
            self.confidence = {name: round(min(0.99, c + draw.uniform(0.03, 0.08)), 3)
                               for name, c in self.confidence.items()}
        durations: list[float] = []
        while True:
            durations.append(max(draw.uniform(0.2, 0.7) for _ in self.confidence))
            gate = evaluate_gate(self.confidence, self.thresholds.gate)
            if gate.passed or len(durations) >= self.thresholds.max_iterations:
                break
            for name in gate.below:  # below the gate: that implementer redoes its part
                self.confidence[name] = round(min(0.99, self.confidence[name]
                                                  + draw.uniform(0.05, 0.15)), 3)
        values = list(self.confidence.values())
        report = {"coordinator": self.coordinator, "phase": self.phase, "iteration": iteration,
                  "attempts": len(durations), "passed": gate.passed, "lowest": min(values),
                  "mean": round(sum(values) / len(values), 3),
                  "confidences": dict(self.confidence), "addressed": list(blockers)}
        return report, durations


def failing_rounds(seed: int, scenario: str, phase: str) -> int:
    """How many Loop 2 rounds of ``phase`` the scenario's objecting validator fails."""
    if scenario == "clean":
        return 0
    if scenario == "escalate":
        return 1_000_000  # never satisfied: the rounds run out and the PO escalates
    return 2 if rng(seed, phase, "rounds").random() < 0.35 else 1


def verdict_for(seed: int, scenario: str, phase: str, validator: str, index: int,
                validators: int, round: int, quality: float) -> Verdict:
    """The verdict of validator number ``index`` (of ``validators``) in ``round``.

    ``quality`` is the mean self-confidence of Loop 3's implementers: better work earns a
    slightly higher confidence. One seeded validator objects (FAIL, with blockers) in the
    scenario's failing rounds; the others pass, more confidently once nobody objects.
    """
    draw = rng(seed, phase, validator, f"r{round}")
    kind = VALIDATOR_TYPES[index % len(VALIDATOR_TYPES)]
    objector = rng(seed, phase, "objector").randrange(validators)
    failing = round <= failing_rounds(seed, scenario, phase)
    if index == objector and failing:
        pool = _BLOCKERS.get(phase, [f"{phase}: acceptance criteria not met"])
        blockers = draw.sample(pool, k=min(len(pool), draw.choice((1, 2))))
        return Verdict(validator_id=validator, validator_type=kind, round=round, vote="FAIL",
                       confidence=round_3(draw.uniform(0.55, 0.72)), blockers=blockers,
                       reasoning=f"{len(blockers)} blocker(s) in the {phase} work")
    low, high = (0.80, 0.90) if failing else (0.90, 0.98)
    confidence = min(0.99, low + (high - low) * draw.random() + 0.1 * max(0.0, quality - 0.8))
    recommendations = [draw.choice(_RECOMMENDATIONS)] if draw.random() < 0.15 else []
    minor = [draw.choice(_MINOR)] if draw.random() < 0.1 else []
    return Verdict(validator_id=validator, validator_type=kind, round=round, vote="PASS",
                   confidence=round_3(confidence), blockers=minor,
                   recommendations=recommendations, reasoning=f"{phase} work reviewed as {kind}")


def round_3(value: float) -> float:
    return round(value, 3)


# -- the processes -----------------------------------------------------------------------------


async def run_coordinator(bus: Bus, args: argparse.Namespace) -> dict[str, Any]:
    """A Loop 3 coordinator: implement, report, block until Loop 2 is done; retry meanwhile."""
    channels = PhaseChannels(args.phase)
    coordinator = bus.coordinator(args.swarm, args.id, liveness=LIVENESS)
    implementers = Implementers(args.seed, args.phase, args.id, Thresholds.preset())
    deadline = anyio.current_time() + args.timeout
    reports: dict[int, dict[str, Any]] = {}

    async def implement(iteration: int, blockers: Sequence[str]) -> None:
        report = reports.get(iteration)
        if report is None:  # (a request redelivered after a failed publish is not redone)
            report, durations = implementers.iterate(iteration, blockers)
            for seconds in durations:  # the implementers work concurrently: the slowest counts
                await anyio.sleep(seconds * args.pace)
            reports[iteration] = report
        await bus.publish(args.swarm, channels.loop3, report, sender=args.id,
                          signal_id=stable_id("loop3", args.phase, args.id, f"i{iteration}"))

    async def on_retry(request: RetryRequest) -> None:
        await implement(request.iteration, request.blockers)

    async with coordinator.heartbeating():
        await implement(1, ())
    done = await coordinator.wait_for(channels.loop2_done, timeout=_left(deadline),
                                      watch=[ORCHESTRATOR], on_retry=on_retry)
    decided = await coordinator.wait_for(channels.decision, timeout=_left(deadline),
                                         watch=[ORCHESTRATOR])
    return {"agent": args.id, "role": "coordinator", "phase": args.phase,
            "iterations": [{k: r[k] for k in ("iteration", "attempts", "lowest", "mean")}
                           for r in reports.values()],
            "loop2_done": done.as_dict(), "decision": decided.as_dict()}


async def run_validator(bus: Bus, args: argparse.Namespace) -> dict[str, Any]:
    """A Loop 2 validator: one verdict per review request, until the phase's review closes."""
    channels = PhaseChannels(args.phase)
    validator = bus.coordinator(args.swarm, args.id, liveness=LIVENESS)
    deadline = anyio.current_time() + args.timeout
    verdicts: list[dict[str, Any]] = []
    while True:
        delivery = await validator.wait_for(channels.review, timeout=_left(deadline),
                                            watch=[ORCHESTRATOR])
        request: dict[str, Any] = delivery.signal.payload or {}
        if request.get("close"):
            break
        round = int(request["round"])
        verdict = verdict_for(args.seed, args.scenario, args.phase, args.id, args.index,
                              args.validators, round, float(request.get("quality", 0.0)))
        async with validator.heartbeating():
            await anyio.sleep(rng(args.seed, args.phase, args.id, f"t{round}").uniform(0.3, 0.8)
                              * args.pace)  # reviewing
            await publish_verdict(bus, args.swarm, verdict, round_channel=channels.verdicts(round))
        verdicts.append(msgspec.to_builtins(verdict))
    return {"agent": args.id, "role": "validator", "phase": args.phase, "verdicts": verdicts}


def _left(deadline: float) -> float:
    return max(0.0, deadline - anyio.current_time())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m streambus.cfn.demo_agents")
    sub = parser.add_subparsers(dest="role", required=True)
    for role in ("coordinator", "validator"):
        p = sub.add_parser(role)
        p.add_argument("--swarm", required=True)
        p.add_argument("--phase", required=True)
        p.add_argument("--id", required=True)
        p.add_argument("--seed", type=int, required=True)
        p.add_argument("--timeout", type=float, default=60.0)
        p.add_argument("--pace", type=float, default=1.0)
        if role == "validator":
            p.add_argument("--index", type=int, required=True)
            p.add_argument("--validators", type=int, required=True)
            p.add_argument("--scenario", choices=SCENARIOS, default="standard")
    return parser


async def _main(args: argparse.Namespace) -> int:
    """Run the agent; SIGTERM/SIGINT cancel it (so its wait is recorded ``cancelled``)."""
    run = run_coordinator if args.role == "coordinator" else run_validator
    try:
        async with connect() as bus:
            outcome = await run_interruptible(lambda: run(bus, args))
    except StreambusError as failure:
        print(f"{args.id}: {failure}", file=sys.stderr)
        return 2 if isinstance(failure, WaitTimeout) else 3 if isinstance(failure, PeerDead) else 1
    if outcome.signum is not None:
        return 128 + outcome.signum
    print(json.dumps(outcome.result), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"{args.id}: %(levelname)s %(message)s")
    return anyio.run(_main, args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
