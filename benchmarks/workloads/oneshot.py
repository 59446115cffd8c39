"""One-shot CLI calls: ``streambus signal`` and ``streambus wait`` (the signal already there),
each a whole process, against a bare redis-py script doing the same commands
(``benchmarks/bare_oneshot.py``), and what importing each costs.

A shell-driven agent pays a process per call, so what counts is the whole process: start-up,
imports, connecting, the commands, exit. Each pair is timed in turn (streambus, bare,
streambus, bare, ...) after one uncounted warm-up pair, so drift in the machine's load hits
both alike; the ratio is taken pair by pair and its median reported, beside each side's median
wall and CPU time (``os.wait4``'s rusage of the finished child).

The package is byte-compiled first (``compileall``), as installing a wheel does: in a checkout
run with ``PYTHONDONTWRITEBYTECODE`` every import would otherwise compile its source on every
call, which no installed user pays (redis-py, installed by pip, is always compiled).

Imports: ``python -X importtime`` of ``import streambus.cli`` and of ``import redis``, the sum
of each module's own time, the smallest of several runs per module (the figure least moved by
a busy machine).
"""

from __future__ import annotations

import compileall
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

import anyio

import streambus
from benchmarks.common import load_average
from benchmarks.session import Session

SWARM: Final = "bench-oneshot"
BARE: Final = Path(__file__).parent.parent / "bare_oneshot.py"
_IMPORT_LINE: Final = re.compile(r"import time:\s+(\d+) \|\s+\d+ \| \s*(\S+)")


async def run_oneshot(session: Session, runs: int, import_runs: int = 7) -> dict[str, Any]:
    load_start = load_average()
    compiled = compileall.compile_dir(Path(streambus.__file__).parent, quiet=1)
    cli = _cli()
    env = {**os.environ, "STREAMBUS_REDIS_URL": session.url,
           "STREAMBUS_NAMESPACE": session.namespace}
    bare_stream = f"{session.namespace}:bare-oneshot"
    signal = await anyio.to_thread.run_sync(_pairs, runs, lambda i: (
        [*cli, "signal", SWARM, "go", "--payload", '{"n": 1}'],
        [sys.executable, str(BARE), "signal", session.url, bare_stream, '{"n": 1}']), env)
    session.reporter.advance(f"signal: {signal['ratio_median']:.2f}x bare redis-py")
    await session.bus.publish(SWARM, "ready", {"n": 1})
    await session.admin.xadd(bare_stream + ":ready", {"e": '{"n": 1}'})
    wait = await anyio.to_thread.run_sync(_pairs, runs, lambda i: (
        [*cli, "wait", SWARM, f"c{i}", "ready", "--timeout", "10"],
        [sys.executable, str(BARE), "wait", session.url, bare_stream + ":ready", f"g{i}"]), env)
    imports = await anyio.to_thread.run_sync(_imports, import_runs)
    session.reporter.advance(f"wait: {wait['ratio_median']:.2f}x; import streambus.cli "
                             f"{imports['streambus.cli']['ms']:.0f} ms, redis "
                             f"{imports['redis']['ms']:.0f} ms")
    return {
        "workload": "oneshot", "title": "one-shot CLI calls", "runs": runs,
        "byte_compiled": bool(compiled), "cli": " ".join(cli[:3]),
        "signal": signal, "wait": wait, "imports": imports,
        "load_average": {"start": load_start, "end": load_average()},
    }


def _cli() -> list[str]:
    """The ``streambus`` console script next to this interpreter, else ``python -m``."""
    script = Path(sys.executable).parent / "streambus"
    if script.exists():
        return [str(script)]
    found = shutil.which("streambus")
    return [found] if found else [sys.executable, "-m", "streambus"]


def _pairs(runs: int, commands: Any, env: dict[str, str]) -> dict[str, Any]:
    """Time ``commands(i)`` = (streambus, bare) in turn; the warm-up pair is not counted."""
    ours: list[tuple[float, float]] = []
    bare: list[tuple[float, float]] = []
    for i in range(runs + 1):
        a, b = commands(i)
        timed_a, timed_b = _timed(a, env), _timed(b, env)
        if i:
            ours.append(timed_a)
            bare.append(timed_b)
    ratios = [x[0] / y[0] for x, y in zip(ours, bare, strict=True)]
    return {
        "streambus": _summary(ours), "bare": _summary(bare),
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
    }


def _timed(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall s, CPU s) of one whole process; it must succeed."""
    began = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - began
    child.returncode = os.waitstatus_to_exitcode(status)
    stderr = child.stderr.read().decode(errors="replace") if child.stderr else ""
    if child.stderr:
        child.stderr.close()
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {child.returncode}: {stderr.strip()}")
    return wall, usage.ru_utime + usage.ru_stime


def _summary(samples: list[tuple[float, float]]) -> dict[str, float]:
    walls, cpus = [s[0] for s in samples], [s[1] for s in samples]
    return {"wall_median_s": round(statistics.median(walls), 4),
            "wall_min_s": round(min(walls), 4), "wall_max_s": round(max(walls), 4),
            "cpu_median_s": round(statistics.median(cpus), 4)}


def _imports(runs: int) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for module in ("streambus.cli", "redis"):
        best: dict[str, int] = {}
        for _ in range(runs):
            err = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                                 capture_output=True, text=True, check=True).stderr
            for match in _IMPORT_LINE.finditer(err):
                name, us = match[2], int(match[1])
                best[name] = min(best.get(name, us), us)
        otel = sum(us for name, us in best.items() if name.startswith("opentelemetry"))
        out[module] = {"ms": round(sum(best.values()) / 1000, 1), "modules": len(best),
                       "opentelemetry_ms": round(otel / 1000, 1),
                       "opentelemetry_modules": sum(1 for n in best
                                                    if n.startswith("opentelemetry"))}
    return out
