"""A soak worker process: ``python -m benchmarks.chaos.worker ARGS_JSON``.

Hosts one or more coordinators of one swarm on one bus (so a SIGKILL takes several down at
once, and their waits share the process's dispatcher) until it is killed. It never outlives
the soak: it exits when its parent process is gone.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio

import streambus
from benchmarks.chaos.coordinator import CoordinatorSpec, SoakCoordinator
from streambus import BusUnavailable, Limits

SOAK_LIMITS = Limits(events_maxlen=10_000_000)
"""The ACK stream is the checker's record of every ACK: never trimmed during a soak."""


async def _orphan_guard(parent: int) -> None:
    while os.getppid() == parent:  # noqa: ASYNC110 - no event tells us the parent died
        await anyio.sleep(0.5)
    os._exit(3)


async def serve(args: dict[str, Any]) -> None:
    specs = [CoordinatorSpec(**{**spec, "channels": tuple(spec["channels"])})
             for spec in args["coordinators"]]
    async with anyio.create_task_group() as tg:
        tg.start_soon(_orphan_guard, args["parent"])
        while True:
            try:
                async with streambus.connect(args["url"], namespace=args["namespace"],
                                             limits=SOAK_LIMITS, block_ms=500) as bus, \
                        anyio.create_task_group() as coordinators:
                    for spec in specs:
                        loop = SoakCoordinator(bus, spec, Path(args["journals"]),
                                               Path(args["drain_flag"]), args["incarnation"])
                        coordinators.start_soon(loop.run)
            except BusUnavailable:
                await anyio.sleep(0.05)  # no server to connect to: it is being restarted


def main() -> None:
    # No PR_SET_PDEATHSIG: the soak may start us from a worker thread, whose exit would fire
    # it; the guard below watches the parent process instead.
    anyio.run(serve, json.loads(sys.argv[1]))


if __name__ == "__main__":
    main()
