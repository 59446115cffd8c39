"""Lifecycle hooks fired by a real wait: each hook at its moment, a failing or hanging one
never breaking or stalling the wait beyond its limit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from streambus import Liveness, PeerDead, WaitTimeout
from streambus.bus import Bus
from streambus.hooks import Hooks
from streambus.schema import BlockingEnded, BlockingStarted, RetryRequest, SignalReceived
from tests.clitools import Cli, one_json_object
from tests.helpers import until_states

pytestmark = pytest.mark.anyio


def _recording(seen: list[tuple[str, Any]]) -> Hooks:
    hooks = Hooks("coordinator", agent="c")
    for name in ("on_blocking_start", "on_signal_received", "on_blocking_timeout",
                 "on_peer_dead", "on_retry_request"):
        hooks.add(name, lambda event, name=name: seen.append((name, event)))
    return hooks


async def test_each_hook_fires_at_its_moment(bus: Bus) -> None:
    seen: list[tuple[str, Any]] = []
    coordinator = bus.coordinator("hk", "c", hooks=_recording(seen))
    async with anyio.create_task_group() as tg:
        got: list[object] = []

        async def wait() -> None:
            got.append(await coordinator.wait_for("ch", timeout=10,
                                                  on_retry=lambda request: None))

        tg.start_soon(wait)
        await until_states(bus, "hk", {"c": "waiting"})
        await bus.request_retry("hk", "c", reason="redo", request_id="r1")
        with anyio.fail_after(5):
            while True:
                if any(name == "on_retry_request" for name, _ in seen):
                    break
                await anyio.sleep(0.01)
        await bus.publish("hk", "ch", "go", signal_id="sig-1")
    with pytest.raises(WaitTimeout):
        await coordinator.wait_for("ch", timeout=0.2)
    names = [name for name, _ in seen]
    assert names == ["on_blocking_start", "on_retry_request", "on_signal_received",
                     "on_blocking_start", "on_blocking_timeout"]
    events = dict(seen[:3])
    assert isinstance(events["on_blocking_start"], BlockingStarted)
    assert isinstance(events["on_retry_request"], RetryRequest)
    received = events["on_signal_received"]
    assert isinstance(received, SignalReceived)
    assert received.signal_id == "sig-1"
    assert isinstance(seen[-1][1], BlockingEnded)
    assert seen[-1][1].outcome == "timeout"


async def test_peer_dead_hook_gets_the_peers(bus: Bus) -> None:
    seen: list[tuple[str, Any]] = []
    coordinator = bus.coordinator("hkp", "c", hooks=_recording(seen),
                                  liveness=Liveness(heartbeat_interval=0.1, dead_after=0.3))
    with pytest.raises(PeerDead):
        await coordinator.wait_for("ch", timeout=10, watch=["ghost"])
    [event] = [e for n, e in seen if n == "on_peer_dead"]
    assert list(event["peers"]) == ["ghost"]


async def test_failing_and_hanging_hooks_never_break_the_wait(bus: Bus, tmp_path: Path) -> None:
    hooks = Hooks("coordinator", agent="c")
    hooks.add("on_signal_received", "exit 3")
    hooks.add("on_signal_received", "sleep 30", timeout=0.3)

    def broken(event: object) -> None:
        raise RuntimeError("hook bug")

    hooks.add("on_signal_received", broken)
    await bus.publish("hkf", "ch", "go")
    started = anyio.current_time()
    delivery = await bus.coordinator("hkf", "c", hooks=hooks).wait_for("ch", timeout=10)
    assert delivery.signal.payload == "go"
    assert anyio.current_time() - started < 2.0  # the hanging hook was cut at 0.3 s


def test_cli_wait_runs_shell_hooks_from_a_profile(cli: Cli, bus_args: list[str],
                                                  tmp_path: Path) -> None:
    out = tmp_path / "received.json"
    profile = tmp_path / "hooks.toml"
    profile.write_text(f'[agents.implementer.hooks]\non_signal_received = "cat > {out}"\n')
    assert cli.run("signal", "sw", "ch", "--payload", '"hello"', *bus_args).returncode == 0
    got = cli.run("wait", "sw", "c", "ch", "--timeout", "10s", "--hooks", str(profile),
                  "--agent-type", "implementer", *bus_args)
    assert got.returncode == 0, got.stderr
    assert one_json_object(got.stdout)["payload"] == "hello"
    fired = json.loads(out.read_text())
    assert fired["hook"] == "on_signal_received"
    assert fired["agent_type"] == "implementer"
    assert fired["event"]["type"] == "signal_received"
