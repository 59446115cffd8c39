"""The performance targets of issue 14 in ``results.md``: each a ratio against a baseline
measured in the same run (or a figure to report), never asserted anywhere."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from benchmarks.systems import BLPOP, PUBSUB, STREAMBUS, XREADGROUP, label

ONESHOT_LIMIT = 1.15
"""One-shot ``streambus signal`` / ``wait``: median wall time within this of bare redis-py."""
ONESHOT_RUNS = 10
"""Pairs below which a median ratio says nothing on a shared machine (the ci preset runs 3)."""


def describe_oneshot(r: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """Rows of the "other workloads" table for the one-shot workload."""
    for command in ("signal", "wait"):
        c = r[command]
        ours, bare = c["streambus"], c["bare"]
        yield (f"`streambus {command}`: {ours['wall_median_s'] * 1000:.0f} ms median wall, "
               f"{c['ratio_median']:.2f}x bare redis-py",
               f"bare script {bare['wall_median_s'] * 1000:.0f} ms; ratio pair by pair "
               f"{c['ratio_min']:.2f}-{c['ratio_max']:.2f} over {r['runs']} pairs; CPU "
               f"{ours['cpu_median_s'] * 1000:.0f} vs {bare['cpu_median_s'] * 1000:.0f} ms"
               + ("" if r["byte_compiled"] else "; package was NOT byte-compiled"))
    imports = r["imports"]
    cli, redis = imports["streambus.cli"], imports["redis"]
    yield (f"`import streambus.cli` {cli['ms']:.0f} ms, `import redis` {redis['ms']:.0f} ms",
           f"sum of each module's own time, smallest of several runs; of it OpenTelemetry "
           f"{cli['opentelemetry_ms']:.0f} ms under the CLI, {redis['opentelemetry_ms']:.0f} "
           f"ms ({redis['opentelemetry_modules']} modules) under a bare `import redis`")


def perf_targets(doc: dict[str, Any]) -> Iterator[tuple[str, str, bool | None, str]]:
    """(target, measured, met or None for n/a, note) for each target of issue 14."""
    fanouts = {r["scenario"]: r for r in doc["results"]
               if r.get("workload") == "fanout" and "error" not in r}
    one = fanouts.get("one-process")
    if one is not None and (ratio := _p99_ratio(one, BLPOP)) is not None:
        applies = one["coordinators"] == 1000
        yield (f"{one['title']}: p99 at or below BLPOP's", f"streambus / BLPOP p99 = "
               f"{ratio:.2f}x", ratio <= 1 if applies else None,
               "" if applies else " (the target is for 1,000)")
    many = fanouts.get("many-processes")
    if many is not None and (lat := _latency(many, STREAMBUS)):
        p99 = lat["p99_us"] / 1000
        applies = many["coordinators"] >= 10_000
        yield (f"{many['title']}: p99 < 300 ms", f"{p99:,.0f} ms",
               p99 < 300 if applies else None, "" if applies else " (the target is for 10,000)")
    for scenario in ("processes", "one-process", "many-processes"):
        if (r := fanouts.get(scenario)) is not None and (cpu := _server_cpu(r)):
            yield (f"{r['title']}: server CPU per delivered signal per waiter", cpu, None,
                   " (reported: what limits a shard)")
        if r is not None and (calls := _server_calls(r)):
            yield (f"{r['title']}: server commands per delivered signal per waiter", calls,
                   None, " (reported; a script and each command it runs count one each)")
    oneshot = next((r for r in doc["results"]
                    if r.get("workload") == "oneshot" and "error" not in r), None)
    if oneshot is not None:
        enough = oneshot["runs"] >= ONESHOT_RUNS
        for command in ("signal", "wait"):
            ratio = oneshot[command]["ratio_median"]
            yield (f"one-shot `streambus {command}`: median wall within {ONESHOT_LIMIT}x of "
                   "bare redis-py", f"{ratio:.2f}x ({oneshot['runs']} pairs)",
                   ratio <= ONESHOT_LIMIT if enough else None,
                   "" if enough else f" (fewer than {ONESHOT_RUNS} pairs: too few to say)")


def _latency(result: dict[str, Any], system: str) -> dict[str, Any]:
    lat: dict[str, Any] = result["systems"].get(system, {}).get("latency", {})
    return lat if lat.get("count") else {}


def _p99_ratio(result: dict[str, Any], baseline: str) -> float | None:
    ours, theirs = _latency(result, STREAMBUS), _latency(result, baseline)
    if not ours or not theirs:
        return None
    return float(ours["p99_us"]) / float(theirs["p99_us"])


def _server_cpu(result: dict[str, Any]) -> str:
    """Server CPU per round / waiters, per system, in µs."""
    parts = []
    for system in (STREAMBUS, XREADGROUP, BLPOP, PUBSUB):
        cpu = result["systems"].get(system, {}).get("server_cpu_ms_per_round")
        if cpu is not None:
            parts.append(f"{label(system)} {cpu * 1000 / result['coordinators']:.1f} µs")
    return "; ".join(parts)


def _server_calls(result: dict[str, Any]) -> str:
    """Server commands per measured round / waiters, per system (the send included)."""
    parts = []
    for system in (STREAMBUS, XREADGROUP, BLPOP, PUBSUB):
        rounds = [r["server_calls"] for r in result["systems"].get(system, {}).get(
            "per_round", []) if not r.get("warmup") and "server_calls" in r]
        if rounds:
            per = sum(rounds) / len(rounds) / result["coordinators"]
            parts.append(f"{label(system)} {per:.1f}")
    return "; ".join(parts)
