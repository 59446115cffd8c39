"""``results.md``: the run's facts, the latency table, the other workloads, and the targets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from benchmarks.common import PERCENTILES, pct_key
from benchmarks.perf_report import describe_oneshot, perf_targets
from benchmarks.systems import STREAMBUS, STREAMBUS_ACK, XREADGROUP, label


def render_markdown(doc: dict[str, Any]) -> str:
    harness, machine, server = doc["harness"], doc["machine"], doc["server"]
    lines = [
        f"# streambus benchmark: preset `{harness['preset']}`",
        "",
        f"- command: `{harness['command']}`",
        f"- machine: {machine['usable_cpus']} usable CPUs ({machine['cpu_count']} online), "
        f"{machine.get('cpu_model') or 'unknown CPU'}; {machine['platform']}; "
        f"Python {machine['python']} ({machine['python_implementation']})",
        f"- server: {server['name']} {server['version']} (Redis {server['redis_version']} "
        f"compatible), {harness['server_origin']}, maxclients {server['maxclients']}",
        f"- load average (1, 5, 15 min): {_load(harness['load_average_start'])} at the start, "
        f"{_load(harness.get('load_average_end'))} at the end; the machine may be shared",
        f"- clock: {doc['clock']}",
        f"- total runtime: {harness.get('runtime_s', 0):.1f} s; started {harness['started']}",
        "",
        "## Signal latency (fan-out: one signal, N waiting coordinators)",
        "",
        "Latency = receive - send per coordinator, in ms; `x sb` = that percentile divided by "
        "streambus's in the same scenario (> 1: slower than streambus). Worker CPU = CPU time "
        "of all waiter processes per round from the moment they were armed until every waiter "
        "had the signal (for the blocking baselines this includes sending their blocking reads); "
        "worker GC = time those processes spent in Python's garbage collector meanwhile; server "
        "CPU = the server's, from just before the send until every waiter had it; others' CPU "
        "= share of the machine used meanwhile by processes that are not this benchmark's "
        "(approximate: it also holds kernel time for loopback networking that no process is "
        "charged for, so it grows with a system's traffic); "
        "load 1m = the highest 1-minute load average seen after a measured round (it counts "
        "this benchmark's own processes too).",
        "",
        *_latency_table(doc["results"]),
        "",
        "## Other workloads",
        "",
        "| workload | result | detail | load 1m |",
        "| --- | --- | --- | --- |",
        *_other_rows(doc["results"]),
        "",
        "## Targets (from issues 6 and 14; reported, never asserted)",
        "",
        "| target | measured | verdict |",
        "| --- | --- | --- |",
        *(f"| {t['target']} | {t['measured']} | {t['verdict']} |" for t in targets(doc)),
    ]
    notes = list(_notes(doc))
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"


def _load(values: list[float] | None) -> str:
    return ", ".join(f"{v:.2f}" for v in values) if values else "?"


def _ms(us: float | None) -> str:
    if us is None:
        return "-"
    ms = us / 1000
    return f"{ms:.2f}" if ms < 100 else f"{ms:,.0f}"


def _latency_table(results: list[dict[str, Any]]) -> Iterator[str]:
    heads = ["scenario", "N", "system", "samples",
             *(f"{pct_key(p)} ms" for p in PERCENTILES), "max ms", "p50 x sb", "p99 x sb",
             "worker CPU ms/round", "worker GC ms/round", "server CPU ms/round",
             "others' CPU %", "load 1m"]
    yield "| " + " | ".join(heads) + " |"
    yield "|" + " --- |" * len(heads)
    for result in results:
        if result.get("workload") != "fanout" or "error" in result:
            continue
        for name, system in result["systems"].items():
            lat, ratio = system["latency"], result["ratios_to_streambus"].get(name, {})
            cpu = system["worker_cpu_ms_per_round"]
            loads = [r["load_1m"] for r in system["per_round"] if not r["warmup"]]
            missed = f" ({system['missed']} missed)" if system["missed"] else ""
            cells = [result["title"], f"{result['coordinators']:,}", label(name),
                     f"{lat.get('count', 0):,}{missed}",
                     *(_ms(lat.get(f"{pct_key(p)}_us")) for p in PERCENTILES),
                     _ms(lat.get("max_us")), _ratio(ratio.get("p50")), _ratio(ratio.get("p99")),
                     f"{cpu['receive']:,.0f}",
                     _num(system.get("worker_gc_ms_per_round")),
                     _num(system.get("server_cpu_ms_per_round")),
                     _num(system.get("others_cpu_pct")),
                     f"{max(loads):.2f}" if loads else "-"]
            yield "| " + " | ".join(cells) + " |"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def _other_rows(results: list[dict[str, Any]]) -> Iterator[str]:
    for result in results:
        kind = result.get("workload")
        load = result.get("load_average", {}).get("end", [None])[0]
        load_text = f"{load:.2f}" if load is not None else "-"
        for what, detail in _describe(kind, result):
            yield f"| {result.get('title', kind)} | {what} | {detail} | {load_text} |"


def _describe(kind: str | None, r: dict[str, Any]) -> Iterator[tuple[str, str]]:
    if "error" in r:
        yield "**failed**", r["error"].replace("|", "/")
    elif kind == "fanout":
        ack = r["systems"].get(STREAMBUS_ACK, {}).get("publish_to_all_acked")
        if ack and ack.get("count"):
            yield (f"publish -> all {r['coordinators']:,} ACKs: p50 {_ms(ack['p50_us'])} ms, "
                   f"p99 {_ms(ack['p99_us'])} ms, max {_ms(ack['max_us'])} ms",
                   f"{ack['count']} rounds, sender side (publish with `await_acks`)")
    elif kind == "pubsub-loss":
        parts = [f"{name}: {s['lost']}/{s['trials']} lost" for name, s in r["systems"].items()]
        yield ", ".join(parts), (f"signal sent before the waiter started; each waiter given "
                                 f"{r['window_s'] * 1000:.0f} ms")
    elif kind == "retries":
        yield (f"{r['throughput_per_s']:,}/s processed while blocked",
               f"{r['processed']:,} requests, timed from the start of `wait_for` "
               f"({r['throughput_first_to_last_per_s']:,}/s first to last handled); "
               f"RSS {r['rss_before'] / 1e6:.0f} -> {r['rss_after'] / 1e6:.0f} MB "
               f"(peak {r['peak_rss'] / 1e6:.0f} MB); "
               f"queued at {r['queue_rate_per_s']:,}/s; {r['pending_after']} left pending")
    elif kind == "heartbeat":
        beat, idle = r["heartbeating"], r["blocked_only"]
        yield (f"{r['overhead_pct_of_one_core']:.2f} % of one core (overhead)",
               f"{r['coordinators']:,} coordinators, beat every {r['interval_s']:g} s, window "
               f"{r['window_s']:g} s: {beat['cpu_pct']:.2f} % with beats vs {idle['cpu_pct']:.2f}"
               f" % blocked only; {beat['beats']:,} beats, {beat['failures']} failed; server "
               f"{beat['server_cpu_pct']:.2f} % vs {idle['server_cpu_pct']:.2f} %")
    elif kind == "memory":
        per = r["mb_per_1000"]
        top = ", ".join(f"{k} {v['bytes'] / 1e6:.2f} MB" for k, v in
                        list(r["by_key_kind"].items())[:4])
        yield (f"{per['steady_state']['used_memory']:.2f} MB per 1,000 coordinators",
               f"steady state (waited, beat, got 1 signal, waiting again); "
               f"{per['waiting_and_beat_once']['used_memory']:.2f} MB/1,000 before the signal; "
               f"without client buffers {per['steady_state']['dataset']:.2f}; biggest: {top}; "
               f"the heartbeat stream reaches "
               f"{r['projected_heartbeat_stream_mb_per_1000_after_retention']:.1f} MB/1,000 "
               f"after its {r['heartbeat_retention_s'] / 3600:g} h retention"
               + "".join(f"; {kind} stream at its {r['events_maxlen']:,}-entry cap: {mb:.1f} "
                         "MB per swarm"
                         for kind, mb in r.get("projected_mb_per_swarm_at_maxlen", {}).items()))
    elif kind == "oneshot":
        yield from describe_oneshot(r)
    elif kind == "cleanup" and r.get("status") != "ok":
        yield "not available", r.get("reason", "")
    elif kind == "cleanup":
        yield (f"{r['removed']:,} removed in {r['cleanup_s'] * 1000:.0f} ms",
               f"{r['removed_per_s']:,}/s; dry run {r['dry_run_s'] * 1000:.0f} ms "
               f"(found {r['dry_run_found']:,}); stale left: {r['stale_state_left']} states, "
               f"{r['stale_groups_left']} groups; {r['active']} live untouched: "
               f"{'yes' if r['live_untouched'] else '**NO**'}")


def _fanout(doc: dict[str, Any], scenario: str) -> dict[str, Any] | None:
    return next((r for r in doc["results"] if r.get("workload") == "fanout"
                 and r.get("scenario") == scenario and "error" not in r), None)


def _result(doc: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((r for r in doc["results"] if r.get("workload") == kind and "error" not in r),
                None)


def _verdict(ok: bool | None, note: str = "") -> str:
    """met / missed / n/a (the run's size is not the target's)."""
    word = "n/a" if ok is None else "met" if ok else "**missed**"
    return f"{word}{note}"


def targets(doc: dict[str, Any]) -> list[dict[str, str]]:
    """Each target of issue 6 with the figure measured in this run."""
    out: list[dict[str, str]] = []

    def add(target: str, measured: str, ok: bool | None, note: str = "") -> None:
        out.append({"target": target, "measured": measured, "verdict": _verdict(ok, note)})

    for scenario, limit_ms, size in (("processes", 25, 100), ("one-process", 50, 1000),
                                     ("many-processes", 1000, 10_000)):
        r = _fanout(doc, scenario)
        lat = (r or {}).get("systems", {}).get(STREAMBUS, {}).get("latency", {})
        if not r or not lat.get("count"):
            continue
        p99 = lat["p99_us"] / 1000
        applies = r["coordinators"] == size
        note = "" if applies else f" (the target is for {size:,})"
        add(f"{r['title']}: p99 < {limit_ms:,} ms", f"{p99:.2f} ms",
            p99 < limit_ms if applies else None, note)
        ratio = r["ratios_to_streambus"].get(XREADGROUP, {}).get("p99")
        if scenario == "processes" and ratio:
            add(f"{r['title']}: p99 within 1.2x of bare XREADGROUP",
                f"streambus / XREADGROUP p99 = {1 / ratio:.2f}x",
                1 / ratio <= 1.2 if applies else None, note)
    if (r := _result(doc, "retries")) is not None:
        add("retry requests: > 20,000/s by one blocked coordinator",
            f"{r['throughput_per_s']:,}/s", r["throughput_per_s"] > 20_000)
    if (r := _result(doc, "heartbeat")) is not None:
        overhead = r["overhead_pct_of_one_core"]
        add("heartbeat: < 1 % of one core for 1,000 coordinators every 5 s",
            f"{overhead:.2f} % ({r['coordinators']:,} every {r['interval_s']:g} s)",
            overhead < 1 if r["coordinators"] >= 1000 and r["interval_s"] == 5 else None)
    for r in (x for x in doc["results"] if x.get("workload") == "memory" and "error" not in x):
        mb = r["mb_per_1000"]["steady_state"]["used_memory"]
        applies = r["coordinators"] >= 1000  # below, fixed per-swarm costs dominate
        add("Redis memory: < 10 MB per 1,000 coordinators",
            f"{mb:.2f} MB (N = {r['coordinators']:,}); but the heartbeat stream alone grows to "
            f"{r['projected_heartbeat_stream_mb_per_1000_after_retention']:.1f} MB per 1,000 "
            f"over its {r['heartbeat_retention_s'] / 3600:g} h retention",
            mb < 10 if applies else None,
            "" if applies else " (N too small to say)")
    if (r := _result(doc, "cleanup")) is not None:
        if r.get("status") == "ok":
            add("cleanup: 10,000 stale coordinators in < 1 s, live ones untouched",
                f"{r['removed']:,} in {r['cleanup_s']:.3f} s, live untouched: "
                f"{r['live_untouched']}",
                r["cleanup_s"] < 1 and r["live_untouched"] if r["stale"] >= 10_000 else None)
        else:
            add("cleanup: 10,000 stale coordinators in < 1 s", "not available", None)
    for target, measured, ok, note in perf_targets(doc):  # issue 14's
        add(target, measured, ok, note)
    return out


def _notes(doc: dict[str, Any]) -> Iterator[str]:
    for r in doc["results"]:
        if r.get("workload") == "fanout" and "error" not in r:
            yield f"- {r['title']}: order {r['order']}; runtime {r['runtime_s']:.1f} s."
            for note in r.get("notes", []):
                yield f"- {r['title']}: {note}."
    for error in doc.get("errors", []):
        yield f"- **error** in {error['workload']}: {error['message']}"
