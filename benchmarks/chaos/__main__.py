"""``python -m benchmarks.chaos --minutes N [--seed S] [--topology single|sentinel|cluster]``
(or ``--recheck DIR``)

Runs one soak (see :mod:`benchmarks.chaos`), prints its table and, for every violation, the
history excerpt; keeps the history in ``--out`` (a new temporary directory by default).
Exit status: 0 when the history holds the contract, 1 on any violation, 2 when the soak
could not run (a topology that did not start, coordinators that never started), 128+N when
stopped by signal N (every process it started is stopped first).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

import anyio

from benchmarks.chaos.history import Report, check, max_s, median_s
from benchmarks.chaos.plan import LINK_FAULT, SoakPlan, make_plan
from benchmarks.chaos.servers import SERVER_FAULTS, TOPOLOGIES, NetnsLink, faketime_library
from benchmarks.chaos.soak import Collected, Soak
from benchmarks.chaos.stored import load_collected, save_plan
from benchmarks.common import BenchmarkError, leaves, machine_facts, report_failure


def machine_skips(topology: str) -> dict[str, str]:
    """The fault kinds this machine (or topology) cannot run, with the reason."""
    skipped = {}
    if topology != "single":
        skipped[LINK_FAULT] = ("sentinel and cluster nodes announce 127.0.0.1, unreachable "
                               "from another network namespace")
    elif (reason := NetnsLink.unavailable()) is not None:
        skipped[LINK_FAULT] = reason
    if faketime_library() is None:
        skipped["clock_skew"] = "libfaketime not installed (Debian package faketime)"
    return skipped


def render(plan: SoakPlan, collected: Collected, report: Report) -> str:
    counts = report.counts
    rows = ["| fault | injected | max recovery (s) | median recovery (s) |",
            "| --- | --- | --- | --- |"]
    for kind in plan.kinds:
        stats = report.faults.get(kind)
        injected = stats.injected if stats else 0
        recoveries = stats.recoveries_ms if stats else []
        rows.append(f"| {kind} | {injected} | {max_s(recoveries)} | {median_s(recoveries)} |")
    observed = {"server_stall": "server_stall (observed: no PING answer within 0.5 s)",
                "master_change": "master_change (observed; scheduled failovers included)"}
    for kind, title in observed.items():
        if kind == "master_change" and plan.topology == "single":
            continue
        stats = report.faults.get(kind)
        recoveries = stats.recoveries_ms if stats else []
        rows.append(f"| {title} | {stats.injected if stats else 0} | {max_s(recoveries)} | "
                    f"{median_s(recoveries)} |")
    for kind, reason in plan.skipped.items():
        rows.append(f"| {kind} | skipped: {reason} | | |")
    skews = sorted({w.skew for w in plan.workers if w.skew})
    if skews:
        rows.append(f"| clock_skew | {len([w for w in plan.workers if w.skew])} worker "
                    f"processes for the whole run ({', '.join(skews)}) | | |")
    rows += ["", "| outcome | count |", "| --- | --- |"]
    outcome_rows = [
        ("signals published", f"{counts['published']} (await_acks {counts['await_acks']}, "
                              f"ack timeouts {counts['ack_timeouts']}, "
                              f"publish retries {counts['publish_retries']})"),
        ("deliveries (wait returns)", f"{counts['deliveries']} (replays of a received "
                                      f"iteration {counts['replays']})"),
        ("timeouts", f"{counts['timeouts']} (latest after the deadline: "
                     f"{report.late_ms['quiet'] / 1000:.2f} s without a fault, "
                     f"{report.late_ms['fault'] / 1000:.2f} s during one)"),
        ("cancelled waits", counts["cancelled"]),
        ("lost", counts["lost"]),
        ("lost on failover (durability none: allowed)",
         f"{counts['lost_on_failover_signals']} signals ({counts['lost_on_failover']} "
         "signal-coordinator pairs)"),
        ("skipped", f"{counts['skipped']} (+ {counts['skipped-unconfirmed']} whose wait ended "
                    "BusUnavailable, receipt not confirmed)"),
        ("duplicates", f"{counts['duplicate']} (same iteration {counts['same-iteration']}; "
                       f"after a failover, allowed: {counts['duplicates_after_failover']} "
                       f"duplicates, {counts['same_iteration_after_failover']} iterations "
                       f"rolled back, {counts['split_brain_deliveries']} deliveries from a "
                       "replaced master)"),
        ("acks without a receipt", counts["ack-without-receipt"]),
        ("acked, then killed before the journal write (allowed)", counts["acked_then_killed"]),

        ("deadline violations", counts["late-timeout"] + counts["early-timeout"]
         + counts["deadline-not-server-time"]),
        ("worker crashes", counts["crash"]),
        ("verdict", "OK" if report.ok else f"{len(report.violations)} VIOLATIONS"),
    ]
    rows += [f"| {name} | {value} |" for name, value in outcome_rows]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__)
    parser.add_argument("--minutes", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--topology", choices=TOPOLOGIES, default="single")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the history is kept (default: a new temporary directory)")
    parser.add_argument("--recheck", type=Path, default=None, metavar="DIR",
                        help="check the history kept in DIR again, without running a soak")
    args = parser.parse_args(argv)
    if args.recheck is not None:
        collected = load_collected(args.recheck)
        return report(collected.plan, collected, f"recheck of {args.recheck}", args.recheck)
    if args.minutes is None:
        parser.error("--minutes is required (unless --recheck)")
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    out = args.out or Path(tempfile.mkdtemp(prefix=f"streambus-chaos-{seed}-"))
    out.mkdir(parents=True, exist_ok=True)
    skipped = machine_skips(args.topology)
    plan = make_plan(seed, args.topology, args.minutes, SERVER_FAULTS[args.topology], skipped)
    save_plan(out, seed, args.topology, args.minutes, skipped)
    command = (f"python -m benchmarks.chaos --minutes {args.minutes:g} --seed {seed} "
               f"--topology {args.topology}")
    library_log = logging.getLogger("streambus")  # the in-process buses' warnings: to a file
    library_log.addHandler(logging.FileHandler(out / "streambus.log"))
    library_log.setLevel(logging.WARNING)
    library_log.propagate = False
    print(f"{command}\nhistory: {out}\nfaults scheduled: {len(plan.schedule)}", flush=True)
    began = time.monotonic()
    try:
        collected = anyio.run(Soak(plan, out).run)
    except Exception as exc:  # the soak could not run at all: not a verdict on the bus
        if all(isinstance(e, BenchmarkError) for e in leaves(exc)):
            code = report_failure("chaos", exc)
            return 2 if code == 1 else code
        traceback.print_exc()
        return 2
    return report(plan, collected, command, out,
                  f"; {time.monotonic() - began:.0f} s in all ("
                  + ", ".join(f"{k} {v:.0f} s" for k, v in collected.timings.items()) + ")")


def report(plan: SoakPlan, collected: Collected, command: str, out: Path, took: str = ""
           ) -> int:
    """Check the history, print the table and the violations; 0 when it holds."""
    verdict = check(collected)
    table = render(plan, collected, verdict)
    facts = machine_facts()
    print(f"\n{table}\n\nmachine: {facts['usable_cpus']} cpus ({facts['cpu_model']}), load "
          f"{facts['load_average']}{took}")
    for violation in verdict.violations[:20]:
        print(f"\nVIOLATION {violation.kind}: {violation.coordinator} {violation.signal}: "
              f"{violation.detail}")
        for line in violation.excerpt:
            print(f"    {line}")
    if verdict.violations:
        print(f"\nreplay: {command}  (history kept in {out})")
    (out / "report.md").write_text(f"{command}\n\n{table}\n")
    (out / "violations.json").write_text(json.dumps(
        [vars(v) for v in verdict.violations], indent=1))
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
