"""The CFN Loop state machine: every transition, illegal ones, phase order, races, rebuild."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from streambus.bus import Bus
from streambus.cfn.loop import ALLOWED, EpicLoop, IllegalTransition, PhaseState
from streambus.errors import InvalidInput

pytestmark = pytest.mark.anyio

S = PhaseState


async def test_a_phase_walks_the_whole_loop(bus: Bus) -> None:
    loop = EpicLoop(bus, "epic-walk")
    await loop.start(["auth"])
    steps = [
        (S.IMPLEMENTING, 1, 0), (S.VALIDATING, 1, 1),   # Loop 3 iteration 1, Loop 2 round 1
        (S.IMPLEMENTING, 2, 1), (S.VALIDATING, 2, 2),   # consensus failed: retry round
        (S.DECIDING, 2, 2), (S.DONE, 2, 2),             # Loop 4: PROCEED
    ]
    for to, iteration, rnd in steps:
        view = await loop.transition("auth", to, reason=f"to {to}")
        assert (view.state, view.iteration, view.round) == (to, iteration, rnd)
    assert (await loop.state()).phase("auth").state == S.DONE
    history = await loop.history()
    assert [(t.from_state, t.to_state) for t in history] == [
        ("pending", "implementing"), ("implementing", "validating"),
        ("validating", "implementing"), ("implementing", "validating"),
        ("validating", "deciding"), ("deciding", "done")]


@pytest.mark.parametrize("start", list(S))
async def test_every_disallowed_transition_is_rejected_and_writes_nothing(
    bus: Bus, start: PhaseState
) -> None:
    loop = EpicLoop(bus, f"epic-{start}")
    await loop.start(["p"])
    path = {S.PENDING: [], S.IMPLEMENTING: [S.IMPLEMENTING],
            S.VALIDATING: [S.IMPLEMENTING, S.VALIDATING],
            S.DECIDING: [S.IMPLEMENTING, S.VALIDATING, S.DECIDING],
            S.DONE: [S.IMPLEMENTING, S.VALIDATING, S.DECIDING, S.DONE],
            S.ESCALATED: [S.IMPLEMENTING, S.ESCALATED]}[start]
    for step in path:
        await loop.transition("p", step)
    before = len(await loop.history())
    for target in set(S) - ALLOWED[start]:
        with pytest.raises(IllegalTransition, match=f"from {start} to {target}"):
            await loop.transition("p", target)
    assert len(await loop.history()) == before
    assert (await loop.state()).phase("p").state == start


async def test_phase_2_cannot_start_before_phase_1_is_done(bus: Bus) -> None:
    loop = EpicLoop(bus, "epic-order")
    await loop.start(["phase-1", "phase-2"])
    with pytest.raises(IllegalTransition, match="phase 'phase-1' is pending"):
        await loop.transition("phase-2", S.IMPLEMENTING)
    for to in (S.IMPLEMENTING, S.VALIDATING, S.DECIDING):
        await loop.transition("phase-1", to)
    with pytest.raises(IllegalTransition, match="is deciding, not done"):
        await loop.transition("phase-2", S.IMPLEMENTING)
    await loop.transition("phase-1", S.DONE)
    view = await loop.transition("phase-2", S.IMPLEMENTING)
    assert view.iteration == 1
    assert (await loop.state()).current == view


async def test_two_writers_racing_one_transition_one_wins(bus: Bus) -> None:
    await EpicLoop(bus, "epic-race").start(["p"])
    outcomes: list[str] = []

    async def move() -> None:
        try:
            await EpicLoop(bus, "epic-race").transition("p", S.IMPLEMENTING)
            outcomes.append("moved")
        except IllegalTransition:
            outcomes.append("refused")

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(move)
    assert sorted(outcomes) == ["moved"] + ["refused"] * 4
    assert len(await EpicLoop(bus, "epic-race").history()) == 1


async def test_unknown_phase_and_restart_with_other_phases_are_refused(bus: Bus) -> None:
    loop = EpicLoop(bus, "epic-bad")
    await loop.start(["a", "b"])
    assert (await loop.start(["a", "b"])).epic == "epic-bad"  # same phases: idempotent
    with pytest.raises(IllegalTransition, match="already started"):
        await loop.start(["a", "c"])
    with pytest.raises(InvalidInput, match="no phase"):
        await loop.transition("zzz", S.IMPLEMENTING)
    with pytest.raises(InvalidInput):
        await loop.start([])


WORKER = textwrap.dedent('''
    import sys, anyio, streambus
    from streambus.cfn.loop import EpicLoop

    url, ns = sys.argv[1:3]

    async def main() -> None:
        async with streambus.connect(url, namespace=ns) as bus:
            loop = EpicLoop(bus, "epic-killed")
            await loop.start(["phase-1", "phase-2"])
            for to in ("implementing", "validating", "implementing", "validating",
                       "deciding", "done", "implementing", "validating"):
                phase = "phase-1" if (await loop.state()).phase("phase-1").state != "done" \\
                    else "phase-2"
                await loop.transition(phase, to)
            print("mid-epic", flush=True)
            await anyio.sleep_forever()

    anyio.run(main)
''')


async def test_state_is_rebuilt_from_the_streams_after_every_process_died(
    bus: Bus, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    script = tmp_path / "epic_worker.py"
    script.write_text(WORKER)
    async with await anyio.open_process(
        [sys.executable, str(script), redis_url, namespace], stderr=subprocess.DEVNULL
    ) as worker:
        assert worker.stdout is not None
        lines = BufferedByteReceiveStream(worker.stdout)
        with anyio.fail_after(20):
            assert await lines.receive_until(b"\n", 1024) == b"mid-epic"
        worker.kill()  # every process that drove the epic is gone
        await worker.wait()
    loop = EpicLoop(bus, "epic-killed")
    cached = await loop.state()
    await bus._store.raw().delete(loop.keys.loop_state)  # lose the cache too
    rebuilt = await loop.rebuild()
    assert rebuilt == cached
    one, two = rebuilt.phase("phase-1"), rebuilt.phase("phase-2")
    assert (one.state, one.iteration, one.round) == (S.DONE, 2, 2)
    assert (two.state, two.iteration, two.round) == (S.VALIDATING, 1, 1)
    assert rebuilt.current == two
