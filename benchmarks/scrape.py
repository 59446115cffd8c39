"""What one scrape of ``streambus metrics`` costs for a swarm of N coordinators.

Run as ``python -m benchmarks.scrape [--coordinators N] [--scrapes K] [--redis-url URL]``.

Method: a throwaway ``valkey-server`` (free port, no persistence) unless a URL is given; N
coordinators start a wait each (``begin_wait``, 10 min deadline; half of them on each of two
channels), then an :class:`~consumers.metrics.Exporter` of that swarm catches up and K scrapes
are timed (``Exporter.families()``: everything a scrape reads, without the HTTP layer), next to
its two largest reads on their own, in the same run and interleaved scrape by scrape: the state
census (``coordinator_census``) and the lapse read (``consumers.lapses.read_lapses``: every
state hash, the liveness index and the reported-dead hash). Wall times on the client, in ms;
the output is one JSON object with the median and p95 of each and their ratios to the census.
No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio

import streambus
from benchmarks.common import machine_facts, throwaway_server
from consumers.lapses import read_lapses
from consumers.metrics import Exporter
from streambus.bus import Bus
from streambus.server import binary_path

SWARM = "scrape-bench"
_CONCURRENCY = 64


async def populate(bus: Bus, coordinators: int) -> None:
    keys = bus.keys(SWARM)
    limit = anyio.Semaphore(_CONCURRENCY)

    async def begin(n: int) -> None:
        async with limit:
            await bus._store.begin_wait(keys, f"c{n}", "ab"[n % 2], 600_000, 0)

    async with anyio.create_task_group() as tg:
        for n in range(coordinators):
            tg.start_soon(begin, n)


async def timed_ms(step: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await step()
    return (time.perf_counter() - started) * 1000


def summary(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": round(statistics.median(ordered), 2),
            "p95_ms": round(ordered[max(0, round(0.95 * len(ordered)) - 1)], 2)}


async def measure(url: str, coordinators: int, scrapes: int) -> dict[str, Any]:
    async with streambus.connect(url, namespace="bench") as bus:
        await populate(bus, coordinators)
        exporter = Exporter(bus, [SWARM])
        steps: dict[str, Callable[[], Awaitable[Any]]] = {
            "census": lambda: bus.census(SWARM),
            "lapses": lambda: read_lapses(bus, SWARM),
            "scrape": exporter.families,
        }
        times: dict[str, list[float]] = {name: [] for name in steps}
        async with anyio.create_task_group() as tg:
            await tg.start(exporter.run)
            for round_ in range(scrapes + 1):
                for name, step in steps.items():
                    took = await timed_ms(step)
                    if round_:  # the first round warms up (scripts, connections)
                        times[name].append(took)
            tg.cancel_scope.cancel()
    result = {name: summary(samples) for name, samples in times.items()}
    census = result["census"]["median_ms"] or 1e-9
    return {
        "coordinators": coordinators, "scrapes": scrapes, **result,
        "ratio_to_census": {name: round(r["median_ms"] / census, 2)
                            for name, r in result.items()},
        "machine": machine_facts(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scrape", description=__doc__)
    parser.add_argument("--coordinators", type=int, default=10_000)
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument("--redis-url", default=None)
    args = parser.parse_args(argv)
    if args.redis_url:
        result = anyio.run(measure, args.redis_url, args.coordinators, args.scrapes)
    else:
        with throwaway_server(binary_path()) as url:
            result = anyio.run(measure, url, args.coordinators, args.scrapes)
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
