"""The checker: the soak's history held against the contract.

Every acknowledged publish (one that returned a stream id) must reach every coordinator of
its swarm: returned by one of its waits, or acknowledged for it in a window the contract
allows. The verdicts, per coordinator and signal:

* **delivered**: a wait returned it.
* **acked, then killed** (allowed): acknowledged for a coordinator of the ``auto`` style whose
  process died inside the wait that took it, before the journal write (``wait_for``
  acknowledges before it returns). ``numbered`` coordinators wait again with the same
  iteration and get it back, so for them this window is closed.
* **skipped** (violation): acknowledged for the coordinator, never returned, and the wait that
  took it lived on (it returned something else, timed out, or was cancelled and waited again).
  **skipped-unconfirmed** is the case where that wait ended ``BusUnavailable`` "receipt could
  not be confirmed; wait again with iteration=N": an ``iteration=0`` caller cannot, so the
  signal is skipped all the same (``tests/test_unconfirmed_receipt.py``).
* **lost** (violation): neither returned nor acknowledged though still in the stream (the
  coordinator returned the channel's later end marker, so its group read past it).
* **lost on failover** (allowed for durability "none" only): gone from the stream after a
  master failover; replication is asynchronous.

Also: no wait returns two different signals for one iteration; a signal returned twice in
different iterations is a duplicate (allowed only across a failover, which can roll an ACK
back); every ACK matches a published signal and every ``acked_by`` an ACK; every timeout
returns at or after its deadline, within a bound, in server time; the deadline itself is the
server's time of the wait's start plus its timeout.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Final

from benchmarks.chaos.coordinator import END_PREFIX
from benchmarks.chaos.journal import Line, waits
from benchmarks.chaos.soak import Collected, FaultRecord
from benchmarks.chaos.workload import PublishRecord
from streambus.schema import stream_id_ms

FAILOVERS: Final = frozenset({"master_failover", "master_change"})
"""Faults that replace a master: a scheduled one, or one the soak saw happen on its own."""
SPLIT_BRAIN_S: Final = 15.0
"""How long around a change of master its effects may land. Seen in the 10-minute Sentinel
soak (seed 12): a killed master restarted from its AOF was promoted by a lagging sentinel 2 s
after the first failover, before it had synced, and the master it replaced kept taking writes
for 10 s more until the sentinels converted it: 13 s of writes gone. A replaced master that
comes back on its own takes writes for 8-10 s (``streambus/testing/sentinel.py``)."""
EARLY_SLACK_MS: Final = 10
DEADLINE_SLACK_MS: Final = 5000
"""How much later than the time read before it ``begin_wait`` may run (a cluster client
re-learning its slots, a loaded machine): far below any clock skew (minutes) it would reveal."""
LATE_BOUND_MS: Final = 2000
FAULT_LATE_EXTRA_MS: Final = 6000
"""A timeout landing in a fault may wait for the server (the end of a wait is recorded with a
5 s limit, reconnects back off up to 0.5 s)."""


@dataclass
class Violation:
    kind: str
    coordinator: str
    signal: str
    detail: str
    excerpt: list[str] = field(default_factory=list)


@dataclass
class FaultStats:
    injected: int = 0
    recoveries_ms: list[int] = field(default_factory=list)


@dataclass
class Report:
    counts: Counter[str] = field(default_factory=Counter)
    violations: list[Violation] = field(default_factory=list)
    faults: dict[str, FaultStats] = field(default_factory=dict)
    late_ms: dict[str, int] = field(default_factory=lambda: {"quiet": 0, "fault": 0})

    @property
    def ok(self) -> bool:
        return not self.violations

    def flag(self, violation: Violation) -> None:
        self.violations.append(violation)
        self.counts[violation.kind] += 1


class Checker:
    def __init__(self, collected: Collected) -> None:
        self.col = collected
        self.report = Report()
        self.failovers = [f for f in collected.faults if f.kind in FAILOVERS]
        self.in_stream = {key: {sid for sid, _ in entries}
                          for key, entries in collected.streams.items()}
        self.published: dict[tuple[str, str], PublishRecord] = {
            (p.swarm, p.signal_id): p for p in collected.publishes}
        self.lost_signals: set[str] = set()
        self.ack_events = {(a.signal_id, a.coordinator): a
                           for acks in collected.acks.values() for a in acks}

    def run(self) -> Report:
        col, report = self.col, self.report
        report.counts["published"] = sum(not p.signal_id.startswith(END_PREFIX)
                                         for p in col.publishes)
        report.counts["await_acks"] = sum(p.await_acks for p in col.publishes)
        report.counts["ack_timeouts"] = sum(p.ack_timeout for p in col.publishes)
        report.counts["publish_retries"] = sum(p.retries for p in col.publishes)
        for swarm in col.plan.swarms:
            for coordinator in col.plan.coordinators_of(swarm):
                self._coordinator(swarm, coordinator)
        self._acks()
        self._faults()
        report.counts["lost_on_failover_signals"] = len(self.lost_signals)
        if not col.drained:
            for coordinator, missing in col.undrained.items():
                report.flag(Violation("not-drained", coordinator, ",".join(missing),
                                      "never received these end markers"))
        for crash in col.crashes:
            report.flag(Violation("crash", crash, "", "a worker process exited on its own"))
        return report

    # -- per coordinator ---------------------------------------------------------------------

    def _coordinator(self, swarm: str, coordinator: str) -> None:
        lines = self.col.journals[coordinator]
        returns = [line for line in lines if line.kind == "recv"]
        self.report.counts["deliveries"] += len(returns)
        self.report.counts["timeouts"] += sum(line.kind == "timeout" for line in lines)
        self.report.counts["cancelled"] += sum(line.kind == "cancelled" for line in lines)
        returned: dict[str, list[Line]] = defaultdict(list)
        for line in returns:
            returned[line["sig"]].append(line)
            published = self.published.get((swarm, line["sig"]))
            if published is not None and published.stream_id == line["sid"]:
                continue
            if published is not None and self._failover_near(stream_id_ms(line["ack"]) / 1000):
                # Read from a master that a failover then replaced; the publish's retry
                # appended it again on the new one (a split brain of async replication).
                self.report.counts["split_brain_deliveries"] += 1
            else:
                self.report.flag(Violation("wrong-id", coordinator, line["sig"],
                                           f"returned as {line['sid']}", [str(line)]))
        for publish in self.col.publishes:
            if publish.swarm == swarm and publish.signal_id not in returned:
                self._not_returned(coordinator, publish, lines)
        self._repeats(coordinator, returned)
        self._deadlines(coordinator, lines)

    def _not_returned(self, coordinator: str, publish: PublishRecord, lines: list[Line]) -> None:
        ack_id = self.col.ack_ids.get((publish.signal_id, coordinator))
        if ack_id is None:
            if publish.stream_id in self.in_stream.get((publish.swarm, publish.channel), set()):
                self.report.flag(Violation(
                    "lost", coordinator, publish.signal_id,
                    f"in the stream as {publish.stream_id}, neither returned nor acknowledged",
                    self._excerpt(lines, stream_id_ms(publish.stream_id))))
            elif (publish.durability == "none" or not publish.durable) and \
                    self._failover_near(publish.sent):
                self.report.counts["lost_on_failover"] += 1
                self.lost_signals.add(publish.signal_id)
            else:
                self.report.flag(Violation(
                    "lost", coordinator, publish.signal_id,
                    f"gone from the stream (durability {publish.durability}, confirmed "
                    f"{publish.durable})", []))
            return
        ack_ms = stream_id_ms(ack_id)
        why = self._honest_window(coordinator, lines, ack_ms, publish.channel)
        if why is not None:
            self.report.counts[why] += 1
            return
        ack = self.ack_events.get((publish.signal_id, coordinator))
        taking = self._taking_wait(lines, ack_ms)
        unconfirmed = taking is not None and taking[1] is not None and \
            taking[1].kind == "unavailable"
        self.report.flag(Violation(
            "skipped-unconfirmed" if unconfirmed else "skipped", coordinator, publish.signal_id,
            f"acknowledged as {ack_id} (stream id {publish.stream_id}, iteration "
            f"{ack.iteration if ack else '?'}), never returned, and the wait that took it "
            f"lived on", self._excerpt(lines, ack_ms)))

    def _taking_wait(self, lines: list[Line], ack_ms: int) -> tuple[Line, Line | None] | None:
        """The wait that was open when the ACK was written (the last begun before it)."""
        before = [(begun, ended) for begun, ended in waits(lines) if begun["t0"] <= ack_ms]
        return max(before, key=lambda wait: wait[0]["t0"], default=None)

    def _honest_window(self, coordinator: str, lines: list[Line], ack_ms: int, channel: str
                       ) -> str | None:
        if self.col.plan.style_of(coordinator) != "auto":
            return None
        taking = self._taking_wait(lines, ack_ms)
        if taking is None or taking[0]["ch"] != channel:
            return None
        begun, ended = taking
        if ended is not None:
            return None  # it lived on (even a BusUnavailable "receipt not confirmed": the
            # caller numbering nothing cannot wait again with that iteration)
        worker = self.col.plan.workers_of(coordinator)
        life = self.col.fleet.life_of(worker, begun.incarnation) if worker else None
        if life is not None and life.fate == "killed":
            return "acked_then_killed"
        return None

    def _repeats(self, coordinator: str, returned: dict[str, list[Line]]) -> None:
        by_iteration: dict[int, list[Line]] = defaultdict(list)
        for signal, lines in returned.items():
            for line in lines:
                by_iteration[line["it"]].append(line)
            iterations = [line["it"] for line in lines]
            if len(lines) == 1:
                continue
            if len(set(iterations)) == 1:
                self.report.counts["replays"] += len(lines) - 1  # same iteration, waited again
                continue
            if self._failover_between(lines):
                self.report.counts["duplicates_after_failover"] += 1
            else:
                self.report.flag(Violation("duplicate", coordinator, signal,
                                           f"returned in iterations {iterations}",
                                           [str(line) for line in lines]))
        for iteration, lines in by_iteration.items():
            signals = sorted({line["sig"] for line in lines})
            if len(signals) < 2:
                continue
            if self._failover_between(lines):  # the iteration counter rolled back with it
                self.report.counts["same_iteration_after_failover"] += 1
            else:
                self.report.flag(Violation("same-iteration", coordinator, ",".join(signals),
                                           f"iteration {iteration} returned {len(signals)}",
                                           [str(line) for line in lines]))

    def _failover_between(self, lines: list[Line]) -> bool:
        acks = [stream_id_ms(line["ack"]) / 1000 for line in lines]
        return self._failover_near(min(acks), max(acks))

    def _failover_near(self, first: float, last: float | None = None) -> bool:
        """A master replaced within :data:`SPLIT_BRAIN_S` of ``first``..``last`` (seconds)."""
        last = first if last is None else last
        return any(first - SPLIT_BRAIN_S <= f.ended and f.started <= last + SPLIT_BRAIN_S
                   for f in self.failovers)

    def _deadlines(self, coordinator: str, lines: list[Line]) -> None:
        after_receipt: dict[int, bool] = {}
        for begun, ended in waits(lines):
            fresh = after_receipt.get(begun.incarnation, False)
            after_receipt[begun.incarnation] = ended is not None and ended.kind == "recv"
            if ended is None or ended.kind != "timeout":
                continue
            deadline, now = ended["deadline"], ended["now"]
            # The deadline is the server's time when begin_wait ran plus the timeout: not
            # before the time read just ahead of it (a wait right after a receipt is never
            # a resumed one, whose deadline is older), and not after it by more than the
            # faults in between delayed begin_wait (it is retried while the server is down).
            start = begun["t0"] + begun["timeout_ms"]
            late_start = deadline - start - self._fault_overlap_ms(coordinator, begun["t0"],
                                                                    deadline)
            rolled_back = self._failover_near(begun["t0"] / 1000)  # an old wait's state
            if late_start > DEADLINE_SLACK_MS or (
                    fresh and deadline < start - EARLY_SLACK_MS and not rolled_back):
                self.report.flag(Violation(
                    "deadline-not-server-time", coordinator, "",
                    f"deadline {deadline} is {deadline - begun['t0']} ms after the wait began "
                    f"(timeout {begun['timeout_ms']} ms)", [str(begun), str(ended)]))
            if now < deadline - EARLY_SLACK_MS:
                self.report.flag(Violation("early-timeout", coordinator, "",
                                           f"returned {deadline - now} ms before its deadline",
                                           [str(begun), str(ended)]))
            # A wait resumed after a restart may find its deadline already past: it is due
            # at once, so count from the later of the deadline and its start.
            due = max(deadline, begun["t0"])
            late = now - due
            overlap = self._fault_overlap_ms(coordinator, due - 1000, now)
            which = "fault" if overlap else "quiet"
            self.report.late_ms[which] = max(self.report.late_ms[which], late)
            bound = LATE_BOUND_MS + (overlap + FAULT_LATE_EXTRA_MS if overlap else 0)
            if late > bound:
                self.report.flag(Violation(
                    "late-timeout", coordinator, "",
                    f"returned {late} ms after its deadline (bound {bound} ms)",
                    [str(begun), str(ended)]))

    def _fault_overlap_ms(self, coordinator: str, start_ms: int, end_ms: int) -> int:
        total = 0
        for fault in self.col.faults:
            if coordinator in fault.affected:
                lo = max(start_ms, fault.started * 1000)
                hi = min(end_ms, fault.ended * 1000)
                total += max(0, round(hi - lo))
        return total

    # -- the ACK streams ---------------------------------------------------------------------

    def _acks(self) -> None:
        for swarm, acks in self.col.acks.items():
            for ack in acks:
                publish = self.published.get((swarm, ack.signal_id))
                if publish is None or (publish.stream_id, publish.channel) != (
                        ack.stream_id, ack.channel):
                    self.report.flag(Violation(
                        "ack-without-receipt", ack.coordinator, ack.signal_id,
                        f"ACK of {ack.stream_id} on {ack.channel} matches no publish"))
        for publish in self.col.publishes:
            for coordinator in publish.acked_by:
                if (publish.signal_id, coordinator) not in self.col.ack_ids and \
                        not self._failover_near(publish.sent, publish.returned):
                    self.report.flag(Violation(
                        "ack-without-receipt", coordinator, publish.signal_id,
                        "the publish reported an ACK the ACK stream does not hold"))

    # -- recovery ----------------------------------------------------------------------------

    def _faults(self) -> None:
        for fault in self.col.faults:
            stats = self.report.faults.setdefault(fault.kind, FaultStats())
            stats.injected += 1
            recovery = self._recovery_ms(fault)
            if recovery is not None:
                stats.recoveries_ms.append(recovery)

    def _recovery_ms(self, fault: FaultRecord) -> int | None:
        """From the fault's end until every coordinator it touched has acknowledged a signal
        again (the ACK's server time)."""
        ended_ms = round(fault.ended * 1000)
        worst = None
        for coordinator in fault.affected:
            firsts = [stream_id_ms(line["ack"]) for line in self.col.journals[coordinator]
                      if line.kind == "recv" and stream_id_ms(line["ack"]) >= ended_ms]
            if firsts:
                worst = max(worst or 0, min(firsts) - ended_ms)
        return worst

    # -- excerpts ----------------------------------------------------------------------------

    def _excerpt(self, lines: list[Line], at_ms: int) -> list[str]:
        """The journal around server time ``at_ms``, and the faults near it."""
        index = next((i for i, line in enumerate(lines)
                      if line.kind == "begin" and line["t0"] > at_ms), len(lines))
        near = [f"fault {f.kind} {f.target} {f.detail} at {f.started:.3f}-{f.ended:.3f}"
                for f in self.col.faults if abs(f.started * 1000 - at_ms) < 5000]
        return [*(str(line) for line in lines[max(0, index - 8):index + 4]), *near]


def check(collected: Collected) -> Report:
    return Checker(collected).run()


def median_s(values_ms: list[int]) -> str:
    return f"{statistics.median(values_ms) / 1000:.2f}" if values_ms else "-"


def max_s(values_ms: list[int]) -> str:
    return f"{max(values_ms) / 1000:.2f}" if values_ms else "-"
