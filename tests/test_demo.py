"""``streambus demo``: the CFN Loop epic end to end, in real processes, through the CLI.

Every run goes through ``python -m streambus demo`` as a subprocess against a real server;
``--pace 0`` drops the simulated work's sleeps (outcomes never depend on them), so a run takes
a couple of seconds. What the tests check comes from the demo's JSON summary *and* from the
bus itself (the epic's loop history, the blocking view).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import IO, Any

import anyio
import pytest

from streambus.bus import Bus
from streambus.cfn.loop import EpicLoop
from streambus.server import read_info, stop_server
from tests.clitools import Cli, finish, one_json_object, status

pytestmark = pytest.mark.anyio

PHASES = ["authentication", "authorization"]


async def run_demo(cli: Cli, *args: str) -> tuple[dict[str, Any], str]:
    """Run the demo with ``--json``; return its summary and its progress (stderr)."""
    result = await anyio.to_thread.run_sync(
        lambda: cli.run("demo", "--pace", "0", "--json", *args))
    assert result.returncode == 0, result.stderr
    return one_json_object(result.stdout), result.stderr


def outcome_of(summary: dict[str, Any]) -> list[Any]:
    """What a seed must reproduce: every verdict, consensus, iteration and decision."""
    return [(p["phase"], p["state"], p["iterations"], p["gate_attempts"], p["retry_requests"],
             [(r["round"], r["score"], r["status"], r["votes"], r["blockers"])
              for r in p["rounds"]], p["decision"]) for p in summary["phases"]]


@pytest.mark.slow
async def test_standard_demo_retries_then_passes_and_runs_phases_in_order(
    cli: Cli, bus_args: list[str], bus: Bus
) -> None:
    summary, progress = await run_demo(cli, "--seed", "7", *bus_args)
    assert summary["outcome"] == "done"
    assert summary["seed"] == 7
    assert re.fullmatch(r"demo-7-[0-9a-f]{6}", summary["swarm"])
    assert "EpicLoop refused an early start" in progress

    for phase in summary["phases"]:
        rounds = phase["rounds"]
        # At least one retry round: round 1 is below consensus with a FAIL and blockers.
        assert len(rounds) >= 2
        assert rounds[0]["status"] == "failed"
        assert rounds[0]["score"] < 0.90
        assert rounds[0]["failed_by"]
        assert rounds[0]["blockers"]
        assert [r["passed"] for r in rounds] == [False] * (len(rounds) - 1) + [True]
        assert rounds[-1]["score"] >= 0.90
        assert phase["iterations"] == len(rounds)  # one Loop 3 iteration per Loop 2 round
        assert phase["retry_requests"] == 3 * (len(rounds) - 1)
        assert phase["state"] == "done"
        assert phase["decision"]["decision"] in ("PROCEED", "DEFER")
        coordinators = ["coordinator-a", "coordinator-b", "coordinator-c"]
        assert sorted(phase["latency_ms"]["loop2_done"]) == coordinators
        assert sorted(phase["latency_ms"]["decision"]) == coordinators
        assert all(0 <= ms < 5000 for ms in phase["latency_ms"]["loop2_done"].values())

    # Every agent exited 0; each coordinator ran every iteration while blocked in ONE wait on
    # loop2-done (its retry requests were handled during that wait), then got the decision.
    agents = summary["agents"]
    assert agents["spawned"] == agents["exited_ok"] == 12
    for result in agents["results"]:
        phase = next(p for p in summary["phases"] if p["phase"] == result["phase"])
        if result["role"] == "coordinator":
            assert [i["iteration"] for i in result["iterations"]] == list(
                range(1, phase["iterations"] + 1))
            assert result["loop2_done"]["channel"] == f"{result['phase']}-loop2-done"
            # Its waits are numbered across phases (same ids): 2 per phase, no more.
            waits = 2 * PHASES.index(result["phase"])
            assert result["loop2_done"]["iteration"] == waits + 1
            assert result["decision"]["iteration"] == waits + 2
            assert result["decision"]["payload"]["decision"] == phase["decision"]["decision"]
        else:
            assert len(result["verdicts"]) == len(phase["rounds"])

    # The bus agrees: phase 2's first transition comes after phase 1 is done, and the state
    # rebuilt from the loop stream alone is the summary's.
    loop = EpicLoop(bus, summary["swarm"])
    history = await loop.history()
    assert [t.phase for t in history] == sorted((t.phase for t in history),
                                                key=PHASES.index)
    done_at = next(i for i, t in enumerate(history)
                   if t.phase == PHASES[0] and t.to_state == "done")
    assert history[done_at + 1].phase == PHASES[1]
    assert (history[done_at + 1].from_state, history[done_at + 1].to_state) == (
        "pending", "implementing")
    rebuilt = await loop.rebuild()
    assert [(p.phase, str(p.state), p.iteration, p.round) for p in rebuilt.phases] == [
        (p["phase"], p["state"], p["iterations"], len(p["rounds"])) for p in summary["phases"]]
    assert summary["rebuilt"]["phases"] == [
        {"phase": p.phase, "state": str(p.state), "loop": None, "iteration": p.iteration,
         "round": p.round} for p in rebuilt.phases]
    rows = {r.coordinator: r for r in await bus.status(summary["swarm"])}
    assert {name for name, r in rows.items() if r.state != "signaled"} == set()
    assert all(r.retries_pending == 0 for r in rows.values())


@pytest.mark.slow
async def test_the_same_seed_reproduces_the_run(cli: Cli, bus_args: list[str]) -> None:
    first, _ = await run_demo(cli, "--seed", "1234", *bus_args)
    again, _ = await run_demo(cli, "--seed", "1234", *bus_args)
    other, _ = await run_demo(cli, "--seed", "1235", *bus_args)
    assert first["swarm"] != again["swarm"]  # a fresh epic each run, on the same bus
    assert outcome_of(first) == outcome_of(again)
    assert outcome_of(first) != outcome_of(other)


async def test_clean_scenario_passes_every_phase_in_one_round(
    cli: Cli, bus_args: list[str]
) -> None:
    summary, _ = await run_demo(cli, "--scenario", "clean", "--validators", "2",
                                "--coordinators", "2", *bus_args)
    assert summary["outcome"] == "done"
    for phase in summary["phases"]:
        assert [r["passed"] for r in phase["rounds"]] == [True]
        assert len(phase["rounds"][0]["votes"]) == 2
        assert phase["iterations"] == 1
        assert phase["retry_requests"] == 0
        assert phase["decision"]["decision"] in ("PROCEED", "DEFER")
    assert summary["agents"]["spawned"] == summary["agents"]["exited_ok"] == 8


@pytest.mark.slow
async def test_escalate_scenario_exhausts_the_rounds_and_phase_2_never_starts(
    cli: Cli, bus_args: list[str], bus: Bus
) -> None:
    summary, _ = await run_demo(cli, "--scenario", "escalate", "--validators", "4",
                                "--seed", "3", *bus_args)
    assert summary["outcome"] == "escalated"
    first, second = summary["phases"]
    assert [r["status"] for r in first["rounds"]] == ["failed"] * 10
    assert first["iterations"] == 10
    assert first["state"] == "escalated"
    assert first["decision"]["decision"] == "ESCALATE"
    assert first["decision"]["blockers"]
    assert "limits reached" in first["decision"]["reasoning"]
    assert second["state"] == "pending"
    assert second["rounds"] == []
    assert second["decision"] is None
    history = await EpicLoop(bus, summary["swarm"]).history()
    assert {t.phase for t in history} == {PHASES[0]}
    assert history[-1].to_state == "escalated"


@pytest.mark.slow
def test_demo_on_the_embedded_server_with_nothing_configured(cli: Cli) -> None:
    """The README's first command: no URL anywhere, so the embedded server starts."""
    assert not any(k.startswith("STREAMBUS_") and k != "STREAMBUS_HOME" for k in cli.env)
    try:
        result = cli.run("demo", "--pace", "0", "--seed", "5")
        assert read_info(cli.home) is not None, "the embedded server did not start"
    finally:
        stop_server(cli.home)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "seed 5" in out
    assert "EpicLoop refused an early start" in out
    assert re.search(r"authentication +Loop 2 +round 1: consensus 0\.\d+ < 0\.90 failed", out)
    blocked = "blocked on authentication-loop2-done: coordinator-a, coordinator-b, coordinator-c"
    assert blocked in out
    assert "consensus/round" in out  # the summary table
    assert "outcome done" in out
    phase_1_done = re.search(r"authentication +-> done", out)
    phase_2_starts = re.search(r"authorization +Loop 3 +-> implementing \(iteration 1", out)
    assert phase_1_done
    assert phase_2_starts
    assert phase_1_done.start() < phase_2_starts.start()


def progress_until(stream: IO[str] | None, pattern: str) -> tuple[list[int], str]:
    """Read the demo's progress until a line matches ``pattern``; return the agents' pids
    reported so far and the epic's swarm id."""
    assert stream is not None
    pids: list[int] = []
    swarm = ""
    for line in stream:
        if match := re.search(r"epic (demo-\d+-[0-9a-f]+)", line):
            swarm = match[1]
        if match := re.search(r"spawned .* \(pids ([\d, ]+)\)", line):
            pids += [int(p) for p in match[1].split(", ")]
        if re.search(pattern, line):
            return pids, swarm
    pytest.fail(f"the demo never printed {pattern!r}")


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def until_gone(pids: list[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while running := [p for p in pids if alive(p)]:
        if time.monotonic() > deadline:
            pytest.fail(f"agent processes still running: {running}")
        time.sleep(0.05)


@pytest.mark.slow
def test_a_dead_agent_fails_the_demo_and_no_agent_is_left_running(
    cli: Cli, bus_args: list[str]
) -> None:
    demo = cli.start("demo", "--seed", "9", "--timeout", "30", *bus_args)
    pids, _ = progress_until(demo.stdout, r"Loop 2 +-> validating")  # all blocked on loop2-done
    os.kill(pids[1], signal.SIGKILL)  # coordinator-b
    code, out, _ = finish(demo)
    assert code == 1
    assert "FAILED: authentication/coordinator-b exited -9" in out
    assert "outcome failed" in out
    until_gone(pids)


@pytest.mark.slow
def test_ctrl_c_stops_the_demo_and_every_agent_records_its_wait_cancelled(
    cli: Cli, bus_args: list[str]
) -> None:
    demo = cli.start("demo", "--seed", "9", "--json", *bus_args)
    # With --json the progress goes to stderr. Interrupt once Loop 2's first round is in: the
    # coordinators have been blocked on loop2-done for the whole round.
    pids, swarm = progress_until(demo.stderr, r"Loop 2 +round 1:")
    demo.send_signal(signal.SIGINT)
    code, out, err = finish(demo)
    assert code == 128 + signal.SIGINT, err
    assert out == ""
    assert "stopped by signal 2" in err
    until_gone(pids)
    states = {r["coordinator"]: r["state"] for r in status(cli, bus_args, swarm)["coordinators"]}
    assert len(states) == 7  # 3 coordinators, 3 validators, the orchestrator (loop2)
    assert {states[c] for c in ("coordinator-a", "coordinator-b", "coordinator-c")} == {
        "cancelled"}


def test_timeout_exits_2_and_stops_every_agent(cli: Cli, bus_args: list[str]) -> None:
    demo = cli.start("demo", "--seed", "9", "--timeout", "1.5", *bus_args)
    pids, _ = progress_until(demo.stdout, r"spawned")
    code, out, _ = finish(demo)
    assert code == 2
    assert "timed out after 1.5 s (--timeout)" in out
    assert "outcome timeout" in out
    until_gone(pids)


@pytest.mark.parametrize("args", [["--validators", "5"], ["--validators", "1"],
                                  ["--coordinators", "0"], ["--scenario", "chaos"],
                                  ["--seed", "-1"]])
def test_invalid_demo_options_exit_64(cli: Cli, bus_args: list[str], args: list[str]) -> None:
    result = cli.run("demo", *args, *bus_args)
    assert result.returncode == 64, result.stderr
    assert result.stdout == ""


def test_summary_json_is_one_line_and_complete(cli: Cli, bus_args: list[str]) -> None:
    result = cli.run("demo", "--pace", "0", "--json", "--scenario", "clean",
                     "--coordinators", "1", "--validators", "2", *bus_args)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert set(summary) >= {"swarm", "seed", "scenario", "outcome", "phases", "latency_ms",
                            "rebuilt", "agents", "elapsed_s", "thresholds"}
    assert summary["thresholds"] == {"gate": 0.75, "consensus": 0.9, "max_iterations": 10,
                                     "max_rounds": 10}
    assert isinstance(summary["seed"], int)  # random, and reported so it can be reused
    assert summary["elapsed_s"] < 30
