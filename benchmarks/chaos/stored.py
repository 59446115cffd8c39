"""A soak's history as kept on disk, read back for the checker: ``python -m benchmarks.chaos
--recheck DIR`` holds a kept history against the (possibly newer) checker, without a rerun.

The soak writes ``plan.json`` (what ``make_plan`` was given), the coordinators' journals,
``publishes.jsonl``, ``faults.jsonl``, ``lives.jsonl`` and ``recorded.json`` (the ACK and
channel streams as Redis held them at the end).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.chaos.coordinator import end_marker
from benchmarks.chaos.fleet import Fleet, Life
from benchmarks.chaos.journal import read_journal
from benchmarks.chaos.plan import CHANNELS, QUIET, SoakPlan, make_plan
from benchmarks.chaos.servers import SERVER_FAULTS
from benchmarks.chaos.soak import Collected, FaultRecord
from benchmarks.chaos.workload import PublishRecord
from streambus import Ack


def save_plan(directory: Path, seed: int, topology: str, minutes: float,
              skipped: dict[str, str]) -> None:
    (directory / "plan.json").write_text(json.dumps(
        {"seed": seed, "topology": topology, "minutes": minutes, "skipped": skipped}))


def load_plan(directory: Path) -> SoakPlan:
    raw = json.loads((directory / "plan.json").read_text())
    return make_plan(raw["seed"], raw["topology"], raw["minutes"],
                     SERVER_FAULTS[raw["topology"]], raw["skipped"])


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def load_collected(directory: Path) -> Collected:
    plan = load_plan(directory)
    journals = {c: read_journal(directory / "journals" / f"{c}.jsonl")
                for c in plan.all_coordinators}
    recorded = json.loads((directory / "recorded.json").read_text())
    lives = [Life(**row) for row in _rows(directory / "lives.jsonl")]
    fleet = Fleet({w.name: w for w in plan.workers}, "", None, [], {}, "", directory,
                  directory / "drain", lives=lives)
    faults = [FaultRecord(**{**row, "affected": tuple(row["affected"])})
              for row in _rows(directory / "faults.jsonl")]
    publishes = [PublishRecord(**{**row, "acked_by": tuple(row["acked_by"])})
                 for row in _rows(directory / "publishes.jsonl")]
    ends = {end_marker(c) for c in (*CHANNELS, QUIET)}
    undrained = {c: sorted(ends - {line["sig"] for line in lines if line.kind == "recv"})
                 for c, lines in journals.items()}
    undrained = {c: missing for c, missing in undrained.items() if missing}
    return Collected(
        plan, directory, publishes, journals,
        {swarm: [Ack(**a) for a in acks] for swarm, acks in recorded["acks"].items()},
        {(s, c): a for s, c, a in recorded["ack_ids"]},
        {(s, c): [(e[0], e[1]) for e in entries] for s, c, entries in recorded["streams"]},
        faults, fleet, not undrained, undrained,
        [f"{life.worker}#{life.incarnation}" for life in lives if life.fate.startswith("crash")])
