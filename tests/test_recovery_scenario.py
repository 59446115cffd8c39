"""The plan's real-world scenario 3: a coordinator dies at item 30 of 50; a replacement
detects it, reads the progress from the bus and resumes at item 31: nothing done twice or
skipped. Both coordinators are real processes; the first is killed with SIGKILL."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import streambus
from streambus.progress import TaskProgress

pytestmark = pytest.mark.anyio

WORKER = textwrap.dedent('''
    import sys, anyio, streambus
    from streambus import Liveness, PeerDead
    from streambus.progress import TaskProgress

    url, ns, me, predecessor, stop_after = sys.argv[1:6]

    async def main() -> None:
        async with streambus.connect(url, namespace=ns) as bus:
            live = Liveness(heartbeat_interval=0.1, dead_after=0.5)
            coordinator = bus.coordinator("epic", me, liveness=live)
            progress = TaskProgress(bus, "epic", "build")
            async with coordinator.heartbeating():
                if predecessor != "-":
                    try:  # blocks until the predecessor's heartbeats lapse
                        await coordinator.wait_for("handover", timeout=30, watch=[predecessor])
                    except PeerDead:
                        print(f"detected {predecessor} dead", flush=True)
                done = {record.item for record in await progress.done()}
                todo = [n for n in range(1, 51) if f"item-{n}" not in done]
                print(f"resume at {todo[0]}", flush=True)
                for n in todo:
                    await progress.record(f"item-{n}", me)
                    if n == int(stop_after):
                        print("paused", flush=True)
                        await anyio.sleep_forever()

    anyio.run(main)
''')


def _start(tmp_path: Path, url: str, namespace: str, me: str, predecessor: str,
           stop_after: int) -> subprocess.Popen[str]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return subprocess.Popen(
        [sys.executable, str(script), url, namespace, me, predecessor, str(stop_after)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


async def test_replacement_resumes_at_item_31_after_a_kill_at_30(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    first = _start(tmp_path, redis_url, namespace, "coordinator-1", "-", 30)
    started = [first]
    try:
        assert first.stdout is not None
        assert first.stdout.readline().strip() == "resume at 1"
        assert first.stdout.readline().strip() == "paused"  # item 30 recorded, 31 not started
        first.kill()  # SIGKILL: no goodbye, its heartbeats just stop
        second = _start(tmp_path, redis_url, namespace, "coordinator-2", "coordinator-1", 0)
        started.append(second)
        out, err = second.communicate(timeout=30)
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
            process.communicate()
    assert second.returncode == 0, err
    assert out.splitlines() == ["detected coordinator-1 dead", "resume at 31"]
    async with streambus.connect(redis_url, namespace=namespace) as bus:
        records = await TaskProgress(bus, "epic", "build").done()
    assert [r.item for r in records] == [f"item-{n}" for n in range(1, 51)]
    assert {r.coordinator for r in records[:30]} == {"coordinator-1"}
    assert {r.coordinator for r in records[30:]} == {"coordinator-2"}


async def test_recording_an_item_twice_changes_nothing(redis_url: str, namespace: str) -> None:
    async with streambus.connect(redis_url, namespace=namespace) as bus:
        progress = TaskProgress(bus, "epic", "twice")
        assert await progress.record("item-1", "a")
        assert not await progress.record("item-1", "b")
        [record] = await progress.done()
    assert record.coordinator == "a"
