"""``streambus demo``: a small swarm in real processes, against whatever bus is configured.

Coordinators A and B start waiting on a channel; a validator publishes the completion signal and
waits for ACKs; a late coordinator starts only *after* the signal was sent and still receives it
(the race the old ``SETEX``/``GET`` polling lost). The full CFN Loop demo builds on this.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import anyio
from anyio.abc import Process

from streambus.bus import Bus
from streambus.errors import AckTimeout


async def run_demo(bus: Bus, *, coordinators: int = 3, timeout: float = 30.0) -> int:
    swarm = f"demo-{uuid.uuid4().hex[:8]}"
    channel = "loop2-complete"
    names = [f"coordinator-{chr(ord('a') + i)}" for i in range(max(1, coordinators))]
    early, late = names[:-1] or names, names[-1:] if len(names) > 1 else []
    print(f"swarm {swarm}: {len(early)} coordinator(s) block on {channel!r}; "
          f"{len(late)} start after the signal")
    processes: dict[str, Process] = {}
    try:
        for name in early:
            processes[name] = await _spawn_wait(bus, swarm, name, channel, timeout)
        await _until_waiting(bus, swarm, early, timeout)
        print(f"  {', '.join(early)} waiting")
        published = await bus.publish(swarm, channel, {"consensus": 0.93, "decision": "PROCEED"},
                                       sender="validator-1")
        print(f"  validator-1 published {published.signal_id} as {published.stream_id}")
        for name in late:
            processes[name] = await _spawn_wait(bus, swarm, name, channel, timeout)
            print(f"  {name} started after the signal")
        try:
            acked = await bus.wait_for_acks(swarm, published.signal_id, names, timeout=timeout)
        except AckTimeout as exc:
            print(f"  ACK timeout: missing {', '.join(exc.missing)}", file=sys.stderr)
            return 2
        rows = [await _result(processes[name]) for name in acked]
    finally:
        for process in processes.values():
            if process.returncode is None:
                process.terminate()
                await process.wait()
    print(f"\n{'COORDINATOR':16} {'EXIT':>4} {'ITER':>4} {'STREAM ID':>18} {'LATENCY':>9}")
    for name, (code, delivery) in zip(acked, rows, strict=True):
        print(f"{name:16} {code:>4} {delivery.get('iteration', '-'):>4} "
              f"{delivery.get('stream_id', '-'):>18} {delivery.get('latency_ms', '-'):>7}ms")
    ok = all(code == 0 for code, _ in rows)
    print(f"\nall {len(rows)} coordinators received and acknowledged the signal" if ok
          else "\nsome coordinators failed")
    return 0 if ok else 1


async def _spawn_wait(bus: Bus, swarm: str, name: str, channel: str, timeout: float) -> Process:
    env = dict(os.environ, STREAMBUS_REDIS_URL=bus.store.url, STREAMBUS_NAMESPACE=bus.namespace)
    return await anyio.open_process(
        [sys.executable, "-m", "streambus", "wait", swarm, name, channel,
         "--timeout", str(timeout)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


async def _until_waiting(bus: Bus, swarm: str, names: list[str], timeout: float) -> None:
    """Wait until every named coordinator recorded a ``waiting`` state (the demo's pacing)."""
    with anyio.fail_after(timeout):
        while True:
            states = {row.get("coordinator"): row.get("state") for row in await bus.status(swarm)}
            if all(states.get(name) == "waiting" for name in names):
                return
            await anyio.sleep(0.05)


async def _result(process: Process) -> tuple[int, dict[str, Any]]:
    assert process.stdout is not None
    output = b""
    async for chunk in process.stdout:
        output += chunk
    code = await process.wait()
    try:
        return code, json.loads(output.decode() or "{}")
    except ValueError:
        return code, {}
