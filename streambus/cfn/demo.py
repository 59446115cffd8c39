"""``streambus demo``: the plan's scenario 1, a CFN Loop epic run by real processes on the bus.

An epic of two phases (authentication, then authorization). For each phase the demo process,
the orchestrator (coordinator ``loop2``), moves the phase through :class:`EpicLoop` and spawns:

- ``--coordinators`` Loop 3 coordinator processes (``streambus.cfn.demo_agents``): their simulated
  implementers report self-confidence until the Loop 3 gate passes; each coordinator reports,
  then *blocks* on the phase's ``loop2-done`` channel (heartbeating, watching the orchestrator)
  and handles retry requests while it blocks;
- ``--validators`` validator processes, blocked on the phase's ``review`` channel.

Loop 2: once every coordinator passed the gate, the orchestrator asks for a review round,
collects the verdicts (:func:`collect_verdicts`) and computes consensus. Below it, the blockers
go to every coordinator as retry requests (a new Loop 3 iteration) and the validators vote
again, up to the thresholds' round limit. Then ``loop2-done`` releases the coordinators (the
orchestrator waits for their ACKs), the Product Owner (:class:`DefaultDecider`, Loop 4) decides,
and the decision is published. PROCEED or DEFER completes the phase and the next one starts
(EpicLoop refuses to start it earlier); ESCALATE stops the epic. Scenarios: ``standard`` (one or
two retry rounds per phase), ``clean`` (none), ``escalate`` (consensus never comes).

Exit status: 0 when the epic ran to its end (an escalation included), 2 on ``--timeout``, 1 when
an agent failed. With ``--json`` the summary is one JSON line on stdout, the progress on stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import anyio.abc
import msgspec
from anyio.abc import Process

from streambus.bus import Bus
from streambus.cfn.consensus import (
    ConsensusResult,
    Thresholds,
    collect_verdicts,
    retry_requests_for,
    send_retry_requests,
    stable_id,
)
from streambus.cfn.decision import DecisionContext, DefaultDecider, publish_decision
from streambus.cfn.demo_agents import IMPLEMENTERS, LIVENESS, ORCHESTRATOR, SCENARIOS, PhaseChannels
from streambus.cfn.demo_view import DemoView
from streambus.cfn.loop import EpicLoop, IllegalTransition, PhaseState, as_dict
from streambus.errors import AckTimeout, InvalidInput, PeerDead, StreambusError, WaitTimeout
from streambus.schema import stream_id_ms

PHASES: Final = ("authentication", "authorization")
_STOP_GRACE_S: Final = 3.0


@dataclass(frozen=True, slots=True)
class DemoOptions:
    scenario: str = "standard"
    coordinators: int = 3
    validators: int = 3
    seed: int | None = None
    """``None``: a random seed (printed, so the run can be reproduced)."""
    timeout: float = 60.0
    pace: float = 1.0
    """Scales the simulated work's durations (outcomes never depend on it)."""
    json: bool = False

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise InvalidInput(f"unknown scenario {self.scenario!r}: use {', '.join(SCENARIOS)}")
        if not 1 <= self.coordinators <= 26:
            raise InvalidInput("--coordinators must be between 1 and 26")
        if not 2 <= self.validators <= 4:
            raise InvalidInput("--validators must be between 2 and 4")
        if self.seed is not None and self.seed < 0:
            raise InvalidInput("--seed must not be negative")
        if self.timeout <= 0 or self.pace < 0:
            raise InvalidInput("--timeout must be positive and --pace not negative")


class DemoFailed(Exception):
    """An agent failed or died; the demo stops."""


@dataclass
class Agent:
    name: str
    phase: str
    process: Process
    out: bytes = b""
    err: bytes = b""
    code: int | None = None
    exited: anyio.Event = field(default_factory=anyio.Event)

    def result(self) -> dict[str, Any]:
        lines = self.out.decode(errors="replace").strip().splitlines()
        try:
            parsed = json.loads(lines[-1]) if lines else {}
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}


class Agents:
    """The agent processes: spawned in sessions of their own, watched, and always stopped."""

    def __init__(self, bus: Bus, tg: anyio.abc.TaskGroup) -> None:
        self.env = dict(os.environ, STREAMBUS_REDIS_URL=bus.url,
                        STREAMBUS_NAMESPACE=bus.namespace)
        self.tg = tg
        self.all: list[Agent] = []
        self.failure: str | None = None
        self.closing = False

    async def spawn(self, role: str, phase: str, name: str, *args: str) -> Agent:
        process = await anyio.open_process(
            [sys.executable, "-m", "streambus.cfn.demo_agents", role, "--phase", phase,
             "--id", name, *args], env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True)  # Ctrl-C reaches the demo only
        agent = Agent(name, phase, process)
        self.all.append(agent)
        self.tg.start_soon(self._watch, agent)
        return agent

    async def _watch(self, agent: Agent) -> None:
        async def drain(stream: anyio.abc.ByteReceiveStream | None, err: bool) -> None:
            if stream is not None:
                async for chunk in stream:
                    if err:
                        agent.err += chunk
                    else:
                        agent.out += chunk

        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, agent.process.stdout, False)
            tg.start_soon(drain, agent.process.stderr, True)
        agent.code = await agent.process.wait()
        agent.exited.set()
        if agent.code != 0 and self.failure is None and not self.closing:
            tail = agent.err.decode(errors="replace").strip().splitlines()[-3:]
            self.failure = (f"{agent.phase}/{agent.name} exited {agent.code}"
                            + (f": {' | '.join(tail)}" if tail else ""))
            self.tg.cancel_scope.cancel()

    async def finished(self, agents: list[Agent], timeout: float) -> None:
        with anyio.fail_after(timeout):
            for agent in agents:
                await agent.exited.wait()

    async def close(self) -> None:
        """Terminate whatever still runs, then kill what ignores it (call shielded)."""
        self.closing = True
        running = [a for a in self.all if a.process.returncode is None]
        for agent in running:
            agent.process.terminate()
        with anyio.move_on_after(_STOP_GRACE_S):
            for agent in running:
                await agent.process.wait()
        for agent in running:
            if agent.process.returncode is None:
                agent.process.kill()
                await agent.process.wait()


@dataclass
class PhaseResult:
    phase: str
    state: str = "pending"
    iterations: int = 0
    gate_attempts: list[int] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    retry_requests: int = 0
    decision: dict[str, Any] | None = None
    latency_ms: dict[str, Any] = field(default_factory=lambda: {
        "loop3": [], "review": [], "loop2_done": {}, "decision": {}})

    def as_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "state": self.state, "iterations": self.iterations,
                "gate_attempts": self.gate_attempts, "rounds": self.rounds,
                "retry_requests": self.retry_requests, "decision": self.decision,
                "latency_ms": self.latency_ms}


class Demo:
    """One run of the demo epic (see the module docstring)."""

    def __init__(self, bus: Bus, options: DemoOptions, view: DemoView) -> None:
        self.bus = bus
        self.options = options
        self.view = view
        self.seed = options.seed if options.seed is not None else secrets.randbelow(1_000_000)
        self.swarm = f"demo-{self.seed}-{secrets.token_hex(3)}"
        self.loop = EpicLoop(bus, self.swarm)
        self.thresholds = Thresholds.preset("standard")
        self.coordinators = [f"coordinator-{chr(ord('a') + i)}"
                             for i in range(options.coordinators)]
        self.validators = [f"validator-{i + 1}" for i in range(options.validators)]
        self.results = {phase: PhaseResult(phase) for phase in PHASES}
        self.deadline = 0.0
        self.outcome = "running"
        self.agents: Agents | None = None

    def left(self) -> float:
        return max(0.0, self.deadline - anyio.current_time())

    async def run(self) -> int:
        """Run the epic; always stops every agent. Returns the exit status."""
        self.deadline = anyio.current_time() + self.options.timeout
        error: BaseException | None = None
        async with anyio.create_task_group() as tg:
            self.agents = agents = Agents(self.bus, tg)
            tg.start_soon(self.view.poll, self.bus, self.swarm)
            try:
                with anyio.move_on_after(self.options.timeout) as scope:
                    async with self.bus.coordinator(self.swarm, ORCHESTRATOR).heartbeating(
                            LIVENESS.heartbeat_interval):
                        await self._epic()
                if scope.cancelled_caught:
                    self.outcome = "timeout"
            except (WaitTimeout, AckTimeout, TimeoutError):
                self.outcome = "timeout"
            except (PeerDead, DemoFailed) as exc:
                error = exc
            except StreambusError as exc:
                error = exc  # raised below, outside the task group (not as an ExceptionGroup)
            finally:
                with anyio.CancelScope(shield=True):
                    await agents.close()
            tg.cancel_scope.cancel()
        if agents.failure is not None:  # an agent failed: the task group was cancelled
            self.outcome = "failed"
            self.view.log("-", f"FAILED: {agents.failure}")
            return 1
        if isinstance(error, PeerDead | DemoFailed):
            self.outcome = "failed"
            self.view.log("-", f"FAILED: {error}")
            return 1
        if error is not None:
            raise error
        if self.outcome == "timeout":
            self.view.log("-", f"timed out after {self.options.timeout:g} s (--timeout)")
            return 2
        return 0

    async def _epic(self) -> None:
        await self.loop.start(list(PHASES))
        self.view.log("epic", f"started with phases {' -> '.join(PHASES)}")
        try:  # the state machine guards the order: a later phase cannot start first
            await self.loop.transition(PHASES[1], PhaseState.IMPLEMENTING)
        except IllegalTransition as exc:
            self.view.log("epic", f"EpicLoop refused an early start: {exc}")
        for phase in PHASES:
            if await self._phase(phase) != PhaseState.DONE:
                self.outcome = "escalated"
                return
        self.outcome = "done"

    async def _move(self, phase: str, to: PhaseState, reason: str,
                    detail: Any = None) -> tuple[int, int]:
        view = await self.loop.transition(phase, to, reason=reason, detail=detail)
        result = self.results[phase]
        result.state, result.iterations = str(view.state), view.iteration
        self.view.set_stage(phase, PHASES.index(phase) + 1, len(PHASES), str(view.state),
                            view.iteration, view.round)
        loop = f"Loop {view.loop}" if view.loop else "      "
        self.view.log(phase, f"{loop}  -> {view.state} (iteration {view.iteration}, round "
                             f"{view.round}): {reason}")
        return view.iteration, view.round

    async def _phase(self, phase: str) -> PhaseState:
        assert self.agents is not None
        channels = PhaseChannels(phase)
        result = self.results[phase]
        iteration, _ = await self._move(phase, PhaseState.IMPLEMENTING,
                                        "phase starts: Loop 3 iteration 1")
        common = ("--swarm", self.swarm, "--seed", str(self.seed),
                  "--timeout", f"{self.left():.1f}", "--pace", str(self.options.pace))
        spawned = [await self.agents.spawn("coordinator", phase, name, *common)
                   for name in self.coordinators]
        spawned += [await self.agents.spawn(
            "validator", phase, name, *common, "--index", str(index),
            "--validators", str(len(self.validators)), "--scenario", self.options.scenario)
            for index, name in enumerate(self.validators)]
        self.view.log(phase, f"spawned {', '.join(a.name for a in spawned)} (pids "
                             f"{', '.join(str(a.process.pid) for a in spawned)})")
        while True:
            reports = await self._reports(phase, iteration)
            result.gate_attempts.append(sum(r["attempts"] for r in reports))
            if not all(r["passed"] for r in reports):
                await self._move(phase, PhaseState.ESCALATED, "the Loop 3 gate was not reached")
                return await self._close(phase, spawned, PhaseState.ESCALATED, released=False)
            quality = round(sum(r["mean"] for r in reports) / len(reports), 3)
            iteration, round_ = await self._move(
                phase, PhaseState.VALIDATING, f"every coordinator passed the gate (lowest "
                f"implementer {min(r['lowest'] for r in reports):.2f}); Loop 2 round starts",
                detail={"quality": quality})
            consensus = await self._round(phase, channels, iteration, round_, quality)
            if (consensus.passed or round_ >= self.thresholds.max_rounds
                    or iteration >= self.thresholds.max_iterations):
                break
            requests = retry_requests_for(consensus, self.coordinators, scope=phase,
                                          requested_by=ORCHESTRATOR, iteration=iteration + 1)
            if not requests:
                break  # incomplete without blockers: a validator died; the PO decides
            iteration, _ = await self._move(phase, PhaseState.IMPLEMENTING, requests[0].reason,
                                            detail={"blockers": list(consensus.blockers)})
            await send_retry_requests(self.bus, self.swarm, requests)
            result.retry_requests += len(requests)
            self.view.log(phase, f"Loop 2  retry requests to {len(requests)} blocked "
                                 f"coordinators: {'; '.join(consensus.blockers) or '-'}")
        return await self._finish(phase, channels, spawned, consensus, iteration)

    async def _reports(self, phase: str, iteration: int) -> list[dict[str, Any]]:
        """Block until every coordinator reported iteration ``iteration`` past the gate."""
        coordinator = self.bus.coordinator(self.swarm, ORCHESTRATOR, liveness=LIVENESS)
        reports: dict[str, dict[str, Any]] = {}
        while missing := [c for c in self.coordinators if c not in reports]:
            delivery = await coordinator.wait_for(PhaseChannels(phase).loop3,
                                                  timeout=self.left(), watch=missing)
            report: dict[str, Any] = delivery.signal.payload
            if report.get("iteration") != iteration or report.get("coordinator") not in missing:
                continue  # not this iteration's (cannot happen in order; never counted twice)
            reports[report["coordinator"]] = report
            self.results[phase].latency_ms["loop3"].append(delivery.latency_ms)
            self.view.log(phase, f"Loop 3  {report['coordinator']} passed the gate "
                                 f"(lowest {report['lowest']:.2f}, mean {report['mean']:.2f}, "
                                 f"{report['attempts']} attempt(s)); blocks on loop2-done")
        return [reports[c] for c in self.coordinators]

    async def _round(self, phase: str, channels: PhaseChannels, iteration: int, round_: int,
                     quality: float) -> ConsensusResult:
        """One Loop 2 round: ask the validators, collect their verdicts, compute consensus."""
        review = await self.bus.publish(
            self.swarm, channels.review, {"round": round_, "iteration": iteration,
                                          "quality": quality},
            sender=ORCHESTRATOR, signal_id=stable_id("review", phase, f"r{round_}"))
        consensus = await collect_verdicts(
            self.bus, self.swarm, ORCHESTRATOR, channels.verdicts(round_), self.validators,
            round=round_, threshold=self.thresholds.consensus, timeout=self.left(),
            watch=self.validators, liveness=LIVENESS)
        result = self.results[phase]
        result.latency_ms["review"] += (await self._acks(review.signal_id, review.stream_id,
                                                         self.validators)).values()
        result.rounds.append({
            "round": round_, "iteration": iteration, "score": round(consensus.score, 6),
            "status": str(consensus.status), "passed": consensus.passed,
            "failed_by": list(consensus.failed_by), "missing": list(consensus.missing),
            "blockers": list(consensus.blockers),
            "minor_blockers": list(consensus.minor_blockers),
            "recommendations": list(consensus.recommendations),
            "votes": [{"validator": v.validator_id, "type": v.validator_type, "vote": v.vote,
                       "confidence": v.confidence, "blockers": v.blockers}
                      for v in consensus.votes]})
        votes = ", ".join(f"{v.validator_id} {v.vote} {v.confidence:.2f}"
                          for v in consensus.votes)
        self.view.log(phase, f"Loop 2  round {round_}: consensus {consensus.score:.3f} "
                             f"{'>=' if consensus.passed else '<'} "
                             f"{consensus.threshold:.2f} {consensus.status} ({votes})")
        self.view.blocking(phase, [r.as_dict() for r in await self.bus.status(self.swarm)])
        return consensus

    async def _finish(self, phase: str, channels: PhaseChannels, spawned: list[Agent],
                      consensus: ConsensusResult, iteration: int) -> PhaseState:
        """Loop 2 is done: release the coordinators, let the Product Owner decide (Loop 4)."""
        result = self.results[phase]
        done = await self.bus.publish(
            self.swarm, channels.loop2_done,
            {"round": consensus.round, "score": consensus.score, "status": str(consensus.status)},
            sender=ORCHESTRATOR, signal_id=stable_id("loop2-done", phase),
            await_acks=self.coordinators, ack_timeout=self.left())
        result.latency_ms["loop2_done"] = await self._acks(done.signal_id, done.stream_id,
                                                           self.coordinators)
        self.view.log(phase, f"Loop 2  done: loop2-done ACKed by {len(done.acked_by)} "
                             f"coordinators ({_ms(result.latency_ms['loop2_done'])})")
        iteration, round_ = await self._move(
            phase, PhaseState.DECIDING, f"Loop 2 done ({consensus.status}); Product Owner "
                                        "decides")
        decision = await DefaultDecider().decide(DecisionContext(
            consensus, iteration=iteration, thresholds=self.thresholds))
        published = await publish_decision(self.bus, self.swarm, decision,
                                           channel=channels.decision, phase=phase, round=round_,
                                           iteration=iteration)
        await self.bus.wait_for_acks(self.swarm, published.signal_id, self.coordinators,
                                     timeout=self.left())
        result.latency_ms["decision"] = await self._acks(
            published.signal_id, published.stream_id, self.coordinators)
        result.decision = {"decision": str(decision.decision),
                           "confidence": decision.confidence, "reasoning": decision.reasoning,
                           "backlog_items": list(decision.backlog_items),
                           "blockers": list(decision.blockers)}
        self.view.log(phase, f"Loop 4  Product Owner: {decision.decision} (confidence "
                             f"{decision.confidence:.2f}) ACKed by the coordinators "
                             f"({_ms(result.latency_ms['decision'])})")
        final = PhaseState.DONE if decision.approved else PhaseState.ESCALATED
        await self._move(phase, final, f"{decision.decision}: {decision.reasoning}",
                         detail=result.decision)
        return await self._close(phase, spawned, final)

    async def _close(self, phase: str, spawned: list[Agent], final: PhaseState, *,
                     released: bool = True) -> PhaseState:
        """End the phase's review (validators exit) and wait for its agents to exit.

        Not ``released``: the coordinators never got ``loop2-done``; the demo stops them."""
        assert self.agents is not None
        await self.bus.publish(self.swarm, PhaseChannels(phase).review, {"close": True},
                               sender=ORCHESTRATOR, signal_id=stable_id("review", phase, "close"))
        if not released:
            return final
        await self.agents.finished(spawned, min(self.left(), 15.0))
        self.view.log(phase, f"all {len(spawned)} agents of the phase exited 0")
        return final

    async def _acks(self, signal_id: str, stream_id: str, agents: list[str]) -> dict[str, int]:
        """Publish -> ACK latency per agent that acknowledged, both in server time."""
        latencies = {}
        for agent in agents:
            if ack_id := await self.bus.ack_id(self.swarm, signal_id, agent):
                latencies[agent] = stream_id_ms(ack_id) - stream_id_ms(stream_id)
        return latencies

    async def summary(self, elapsed: float) -> dict[str, Any]:
        rebuilt: dict[str, Any] | None = None
        # (the epic may never have started, or the bus be gone: then there is nothing)
        with anyio.move_on_after(5), contextlib.suppress(StreambusError):
            rebuilt = as_dict(await self.loop.rebuild())
        agents = self.agents.all if self.agents is not None else []
        phases = [r.as_dict() for r in self.results.values()]
        return {
            "swarm": self.swarm, "namespace": self.bus.namespace, "seed": self.seed,
            "scenario": self.options.scenario, "coordinators": len(self.coordinators),
            "validators": len(self.validators), "outcome": self.outcome,
            "thresholds": msgspec.to_builtins(self.thresholds), "phases": phases,
            "latency_ms": {name: [ms for p in phases for ms in _values(p["latency_ms"][name])]
                           for name in ("loop3", "review", "loop2_done", "decision")},
            "rebuilt": rebuilt,
            "agents": {"spawned": len(agents), "exited_ok": sum(a.code == 0 for a in agents),
                       "exit_codes": {f"{a.phase}/{a.name}": a.code for a in agents},
                       "results": [a.result() for a in agents if a.code == 0]},
            "elapsed_s": round(elapsed, 3)}


def _values(latencies: list[int] | dict[str, int]) -> list[int]:
    return list(latencies.values()) if isinstance(latencies, dict) else latencies


def _ms(latencies: dict[str, int]) -> str:
    return ", ".join(f"{name} {ms} ms" for name, ms in latencies.items())


async def run_demo(bus: Bus, options: DemoOptions | None = None) -> int:
    """Run the demo on ``bus``; print progress and a summary; return the exit status."""
    options = options or DemoOptions()
    out = sys.stderr if options.json else sys.stdout
    view = DemoView(out, live=out.isatty())
    demo = Demo(bus, options, view)
    with view:
        view.header(f"streambus demo: epic {demo.swarm}, scenario {options.scenario}, seed "
                    f"{demo.seed}, {options.coordinators} coordinators x {IMPLEMENTERS} "
                    f"implementers, {options.validators} validators, on "
                    f"{bus.url_redacted} (namespace {bus.namespace})")
        code = await demo.run()
        summary = await demo.summary(view.elapsed())
    view.summary(summary)
    if options.json:
        sys.stdout.write(json.dumps(summary) + "\n")
        sys.stdout.flush()
    return code
