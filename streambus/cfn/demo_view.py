"""What ``streambus demo`` shows: live progress while it runs, a summary table at the end.

On a terminal the progress is a ``rich`` live view (the epic's stage, every agent's blocking
state from ``Bus.status``, the latest events); elsewhere (a pipe, a CI log, ``--json``) it is
one plain line per event, plus the blocking view after each Loop 2 round.
"""

from __future__ import annotations

import contextlib
import statistics
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any, Final, TextIO

import anyio
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from streambus.bus import Bus
from streambus.errors import StreambusError

_LOOP_NAMES: Final = {"implementing": "Loop 3", "validating": "Loop 2", "deciding": "Loop 4"}
_STATE_STYLE: Final = {"waiting": "yellow", "signaled": "green", "idle": "dim",
                       "cancelled": "red", "timed_out": "red", "peer_dead": "red"}
_DECISION_STYLE: Final = {"PROCEED": "green", "DEFER": "cyan", "ESCALATE": "red"}


class DemoView:
    """Progress and summary of one demo run, on ``out``; ``live`` uses a rich live view."""

    def __init__(self, out: TextIO, *, live: bool) -> None:
        self.console = Console(file=out, highlight=False,
                               width=None if live else 120, no_color=not live)
        self.live = live
        self.started = anyio.current_time()
        self.title = ""
        self.stage = "starting"
        self.events: deque[str] = deque(maxlen=10)
        self.rows: list[dict[str, Any]] = []
        self._live: Live | None = None

    def __enter__(self) -> DemoView:
        if self.live:
            self._live = Live(self._render(), console=self.console, refresh_per_second=8)
            self._live.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None

    def elapsed(self) -> float:
        return anyio.current_time() - self.started

    # -- progress ------------------------------------------------------------------------------

    def header(self, text: str) -> None:
        self.title = text
        if not self.live:
            self.console.print(text)
        self._refresh()

    def set_stage(self, phase: str, index: int, phases: int, state: str, iteration: int,
                  round: int) -> None:
        loop = _LOOP_NAMES.get(state, "")
        self.stage = (f"phase {index}/{phases} {phase} · {state}"
                      + (f" ({loop})" if loop else "")
                      + f" · iteration {iteration} · round {round}")
        self._refresh()

    def log(self, phase: str, message: str) -> None:
        line = f"[{self.elapsed():5.1f}s] {phase:<15} {message}"
        self.events.append(line)
        if not self.live:
            self.console.print(line, soft_wrap=True)
        self._refresh()

    def blocking(self, phase: str, rows: list[dict[str, Any]]) -> None:
        """Who blocks on what, from the bus's blocking view (plain mode prints it)."""
        self.rows = rows
        if self.live:
            self._refresh()
            return
        waiting: dict[str, list[str]] = {}
        for row in rows:
            if row.get("state") == "waiting":
                waiting.setdefault(str(row.get("channel")), []).append(str(row["coordinator"]))
        for channel, names in sorted(waiting.items()):
            self.log(phase, f"  blocked on {channel}: {', '.join(names)}")

    async def poll(self, bus: Bus, swarm: str) -> None:
        """Refresh the agents table from the bus until cancelled (live mode only)."""
        if not self.live:
            return
        while True:
            # A failed poll is tried again; the demo itself reports a lost bus.
            with contextlib.suppress(StreambusError):
                self.rows = [row.as_dict() for row in await bus.status(swarm)]
            self._refresh()
            await anyio.sleep(0.25)

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render())

    def _render(self) -> RenderableType:
        agents = Table(box=box.SIMPLE, expand=False, pad_edge=False)
        for name, justify in (("agent", "left"), ("state", "left"), ("blocked on", "left"),
                              ("wait #", "right"), ("blocked for", "right"),
                              ("heartbeat", "right"), ("retries pending", "right")):
            agents.add_column(name, justify=justify)  # type: ignore[arg-type]
        for row in self.rows:
            state = str(row.get("state", "?"))
            beat = row.get("last_heartbeat_age_s")
            waited = None
            if state == "waiting" and row.get("since") and "remaining_s" in row:
                waited = row["deadline"] - row["remaining_s"] - row["since"]  # server time
            agents.add_row(
                str(row.get("coordinator")), Text(state, style=_STATE_STYLE.get(state, "")),
                str(row.get("channel") or "-") if state == "waiting" else "-",
                str(row.get("iteration", "-")),
                f"{max(0.0, waited):.1f}s" if waited is not None else "",
                f"{beat:.1f}s ago" if beat is not None else "-",
                str(row.get("retries_pending", 0)))
        return Group(Text(self.title, style="bold"),
                     Text(f"{self.stage} · {self.elapsed():.1f}s", style="cyan"),
                     agents, *(Text(line, style="dim", no_wrap=True, overflow="ellipsis")
                               for line in self.events))

    # -- the end -------------------------------------------------------------------------------

    def summary(self, summary: Mapping[str, Any]) -> None:
        table = Table(title=f"epic {summary['swarm']} · scenario {summary['scenario']} · "
                            f"seed {summary['seed']}", box=box.SIMPLE_HEAD, title_justify="left")
        for name, justify in (("phase", "left"), ("state", "left"), ("iterations", "right"),
                              ("gate tries", "right"), ("consensus/round", "left"),
                              ("decision", "left"), ("loop2-done ACK", "right"),
                              ("decision ACK", "right")):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for phase in summary["phases"]:
            decision = phase.get("decision") or {}
            kind = decision.get("decision", "-")
            table.add_row(
                phase["phase"], phase["state"], str(phase["iterations"] or "-"),
                str(sum(phase["gate_attempts"]) or "-"),
                "\n".join(f"r{r['round']} {r['score']:.3f} {'pass' if r['passed'] else 'fail'}"
                          for r in phase["rounds"]) or "-",
                Text(f"{kind} {decision['confidence']:.2f}" if decision else "-",
                     style=_DECISION_STYLE.get(kind, "")),
                _spread(phase["latency_ms"]["loop2_done"].values()),
                _spread(phase["latency_ms"]["decision"].values()))
        table.caption = ("gate tries: Loop 3 gate evaluations of all coordinators. ACK: publish "
                         "-> ACK by the coordinators, mean / max, server time; the decision is "
                         "often out before they wait for it (delivered as soon as they do)")
        table.caption_justify = "left"
        self.console.print(table)
        for phase in summary["phases"]:
            decision = phase.get("decision")
            if decision:
                self.console.print(f"  {phase['phase']}: {decision['decision']} - "
                                   f"{decision['reasoning']}", soft_wrap=True)
                for item in decision["backlog_items"]:
                    self.console.print(f"    backlog: {item}", soft_wrap=True)
                for item in decision["blockers"]:
                    self.console.print(f"    blocker: {item}", soft_wrap=True)
        self.console.print(
            "signal latency, publish -> ACK in server time (p50 / max ms): "
            + " · ".join(f"{name} {_spread(values, p50=True)} (n={len(values)})"
                         for name, values in summary["latency_ms"].items() if values),
            soft_wrap=True)
        rebuilt = summary.get("rebuilt") or {}
        if rebuilt:
            self.console.print("epic state rebuilt from the loop stream: " + ", ".join(
                f"{p['phase']} {p['state']} (iteration {p['iteration']}, round {p['round']})"
                for p in rebuilt["phases"]), soft_wrap=True)
        agents = summary["agents"]
        self.console.print(
            f"{agents['spawned']} agent processes ({agents['exited_ok']} exited 0); "
            f"outcome {summary['outcome']} in {summary['elapsed_s']:.1f} s; reproduce with "
            f"--seed {summary['seed']} --scenario {summary['scenario']}", soft_wrap=True)


def _spread(values: Iterable[int], *, p50: bool = False) -> str:
    ordered = sorted(values)
    if not ordered:
        return "-"
    middle = statistics.median_low(ordered) if p50 else round(statistics.fmean(ordered))
    return f"{middle} / {ordered[-1]} ms"
