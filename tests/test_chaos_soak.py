"""The chaos soak (``python -m benchmarks.chaos``): its CI-sized run, and its checker.

The run is the soak itself for 30 s on one server, as CI runs it: it must hold the contract
(exit 0) and must really have injected every fault kind it enables (a soak that injects
nothing passes trivially). The checker tests feed it hand-written histories (pure logic, no
server) to show that each violation it promises to catch is caught, and that the one window
the contract allows is allowed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from benchmarks.chaos.fleet import Fleet, Life
from benchmarks.chaos.history import check
from benchmarks.chaos.journal import Line
from benchmarks.chaos.plan import make_plan
from benchmarks.chaos.servers import SERVER_FAULTS
from benchmarks.chaos.soak import Collected
from benchmarks.chaos.workload import PublishRecord
from streambus import Ack
from tests.tools import tools_required

ROOT = Path(__file__).parent.parent
SINGLE_KINDS = ("coordinator_kill", "coordinator_freeze", "wait_cancel", "server_kill",
                "server_freeze", "link_cut")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_30_second_soak_on_one_server_holds_the_contract(tmp_path: Path) -> None:
    seed = int(os.environ.get("STREAMBUS_CHAOS_SEED") or time.time_ns() % 2**31)
    out = tmp_path / "soak"
    began = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.chaos", "--minutes", "0.5", "--seed", str(seed),
         "--topology", "single", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=380, check=False)
    print(run.stdout[-6000:], run.stderr[-3000:], f"took {time.monotonic() - began:.0f} s",
          sep="\n")
    assert run.returncode == 0, f"seed {seed}: violations or a failed soak (history in {out})"
    table = (out / "report.md").read_text()
    rows = {match[1]: match[2] for match in re.finditer(r"^\| (\w+) \| ([^|]+) \|", table,
                                                         re.MULTILINE)}
    for kind in SINGLE_KINDS:
        cell = rows[kind].strip()
        assert cell.startswith("skipped: ") or int(cell) >= 1, (kind, cell)
    assert "clock_skew" in rows
    if tools_required():  # CI installs faketime: clock skew must really have run
        assert not rows["clock_skew"].strip().startswith("skipped"), rows["clock_skew"]
    assert "| verdict | OK |" in table


# -- the checker, on written histories -------------------------------------------------------

NOW = 1_800_000_000_000


def _collected(tmp_path: Path, journals: dict[str, list[Line]], acks: list[Ack],
               publishes: list[PublishRecord], lives: Sequence[Life] = ()) -> Collected:
    plan = make_plan(7, "single", 0.1, SERVER_FAULTS["single"], {"link_cut": "test"})
    fleet = Fleet({w.name: w for w in plan.workers}, "", None, [], {}, "ns", tmp_path,
                  tmp_path / "drain", lives=list(lives))
    coordinators = plan.all_coordinators
    return Collected(
        plan, tmp_path, publishes, {c: journals.get(c, []) for c in coordinators},
        {"sw0": acks, "sw1": [], "sw2": []},
        {(a.signal_id, a.coordinator): f"{NOW + 5}-0" for a in acks},
        {("sw0", "a"): [(p.stream_id, p.signal_id) for p in publishes]},
        [], fleet, True)


def _wait(coordinator: str, incarnation: int, ending: str | None, **fields: object
          ) -> list[Line]:
    begin = Line("begin", coordinator, 100, incarnation,
                 {"ch": "a", "it": fields.get("it", 0), "t0": NOW, "timeout_ms": 1000})
    if ending is None:
        return [begin]
    return [begin, Line(ending, coordinator, 100, incarnation, {"ch": "a", **fields})]


def _everyone_got(signal: str, but: str) -> dict[str, list[Line]]:
    plan = make_plan(7, "single", 0.1, SERVER_FAULTS["single"], {})
    return {c: _wait(c, 1, "recv", it=1, sig=signal, sid=f"{NOW}-0", ack=f"{NOW + 1}-0")
            for c in plan.coordinators_of("sw0") if c != but}


def _publish(signal: str = "sig") -> PublishRecord:
    return PublishRecord(signal, "sw0", "a", "none", False, stream_id=f"{NOW}-0", durable=True)


def _ack(coordinator: str, signal: str = "sig") -> Ack:
    return Ack(coordinator=coordinator, signal_id=signal, channel="a", stream_id=f"{NOW}-0",
               iteration=1)


def test_the_checker_flags_a_signal_acknowledged_for_a_wait_that_lived_on(
        tmp_path: Path) -> None:
    journals = _everyone_got("sig", but="sw0-c0")
    journals["sw0-c0"] = _wait("sw0-c0", 1, "timeout", deadline=NOW + 1000, now=NOW + 1001)
    report = check(_collected(tmp_path, journals, [_ack("sw0-c0")], [_publish()]))
    assert [(v.kind, v.coordinator) for v in report.violations] == [("skipped", "sw0-c0")]


def test_the_checker_allows_an_auto_coordinator_killed_inside_the_wait_that_took_it(
        tmp_path: Path) -> None:
    journals = _everyone_got("sig", but="sw0-c0")
    journals["sw0-c0"] = _wait("sw0-c0", 1, None)  # killed in the wait: no ending line
    killed = Life("sw0-w0", 1, 100, 0.0, NOW / 1000 + 1, "killed")
    report = check(_collected(tmp_path, journals, [_ack("sw0-c0")], [_publish()], [killed]))
    assert report.ok, report.violations
    assert report.counts["acked_then_killed"] == 1


def test_the_checker_holds_numbered_coordinators_to_the_closed_window(tmp_path: Path) -> None:
    journals = _everyone_got("sig", but="sw0-c1")  # sw0-c1 numbers its iterations
    journals["sw0-c1"] = _wait("sw0-c1", 1, None, it=1)
    killed = Life("sw0-w0", 1, 100, 0.0, NOW / 1000 + 1, "killed")
    report = check(_collected(tmp_path, journals, [_ack("sw0-c1")], [_publish()], [killed]))
    assert [v.kind for v in report.violations] == ["skipped"]


def test_the_checker_flags_lost_signals_repeats_and_early_timeouts(tmp_path: Path) -> None:
    journals = _everyone_got("sig", but="sw0-c2")
    journals["sw0-c2"] = [
        *_wait("sw0-c2", 1, "timeout", deadline=NOW + 1000, now=NOW + 500),
        *_wait("sw0-c2", 1, "recv", it=4, sig="other", sid=f"{NOW + 1}-0", ack=f"{NOW + 2}-0"),
        *_wait("sw0-c2", 1, "recv", it=4, sig="third", sid=f"{NOW + 2}-0", ack=f"{NOW + 3}-0"),
    ]
    publishes = [_publish(), PublishRecord("other", "sw0", "a", "none", False,
                                           stream_id=f"{NOW + 1}-0", durable=True),
                 PublishRecord("third", "sw0", "a", "none", False,
                               stream_id=f"{NOW + 2}-0", durable=True)]
    report = check(_collected(tmp_path, journals, [], publishes))
    kinds = {v.kind for v in report.violations if v.coordinator == "sw0-c2"}
    assert {"lost", "same-iteration", "early-timeout"} <= kinds
