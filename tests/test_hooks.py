"""Lifecycle hooks: callables and shell commands, failing and hanging ones, profiles."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import anyio
import pytest

from streambus import InvalidInput
from streambus.hooks import HOOK_NAMES, Hooks, HookStatus
from streambus.schema import BlockingStarted, RetryRequest, SignalReceived

pytestmark = pytest.mark.anyio

RECEIVED = SignalReceived(coordinator="coord-a", channel="loop2-done", signal_id="sig-1",
                          stream_id="1716000000000-0", iteration=2)
STARTED = BlockingStarted(coordinator="coord-a", channel="loop2-done", iteration=2,
                          started_ms=1, deadline_ms=2)


def group_alive(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``, from /proc."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited while we looked
        fields = text[text.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


async def until_group_gone(pgid: int) -> None:
    """SIGKILL is delivered at once, but a killed grandchild (which nobody here waits for)
    finishes exiting asynchronously: allow it a bounded moment, as a condition, not a sleep."""
    with anyio.fail_after(1):
        while True:
            if not group_alive(pgid):
                return
            await anyio.sleep(0.01)


async def test_python_hooks_async_and_sync_receive_the_event() -> None:
    seen: list[tuple[str, object]] = []
    threads: list[int] = []

    async def async_hook(event: object) -> None:
        seen.append(("async", event))

    def sync_hook(event: object) -> None:
        threads.append(threading.get_ident())
        seen.append(("sync", event))

    hooks = Hooks("coordinator")
    hooks.add("on_signal_received", async_hook)
    hooks.add("on_signal_received", sync_hook)
    runs = await hooks.fire("on_signal_received", RECEIVED)
    assert [r.status for r in runs] == [HookStatus.OK, HookStatus.OK]
    assert sorted(seen, key=lambda s: s[0]) == [("async", RECEIVED), ("sync", RECEIVED)]
    assert threads != [threading.get_ident()]  # a sync hook cannot block the event loop
    assert await hooks.fire("on_peer_dead", {"peers": {}}) == ()  # nothing configured


async def test_shell_hook_gets_the_event_as_json_on_stdin(tmp_path: Path) -> None:
    out, name = tmp_path / "event.json", tmp_path / "hook-name"
    hooks = Hooks("coordinator", agent="coord-a")
    hooks.add("on_signal_received", f"cat > '{out}'; echo \"$STREAMBUS_HOOK\" > '{name}'")
    [run] = await hooks.fire("on_signal_received", RECEIVED)
    assert run.status is HookStatus.OK
    assert run.returncode == 0
    assert json.loads(out.read_text()) == {
        "hook": "on_signal_received", "agent_type": "coordinator", "agent": "coord-a",
        "event": {"type": "signal_received", "v": 1, "coordinator": "coord-a",
                  "channel": "loop2-done", "signal_id": "sig-1",
                  "stream_id": "1716000000000-0", "iteration": 2, "started_ms": 0}}
    assert name.read_text() == "on_signal_received\n"


async def test_argv_hook_runs_without_a_shell(tmp_path: Path) -> None:
    out = tmp_path / "argv.json"
    hooks = Hooks("validator")
    hooks.add("on_peer_dead", ["python3", "-c",
                               f"import sys; open({str(out)!r}, 'w').write(sys.stdin.read())"])
    [run] = await hooks.fire("on_peer_dead", {"peers": {"coord-c": 130.5}})
    assert run.status is HookStatus.OK
    assert json.loads(out.read_text())["event"] == {"peers": {"coord-c": 130.5}}


async def test_failing_hooks_are_logged_and_never_raised(caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    def broken(event: object) -> None:
        raise RuntimeError("hook bug")

    hooks = Hooks("coordinator")
    hooks.add("on_blocking_start", "echo 'disk full' >&2; exit 3")
    hooks.add("on_blocking_start", broken)
    hooks.add("on_blocking_start", ["/nonexistent/hook-binary"])
    with caplog.at_level(logging.WARNING, logger="streambus.hooks"):
        runs = await hooks.fire("on_blocking_start", STARTED)
    assert [r.status for r in runs] == [HookStatus.FAILED] * 3
    assert runs[0].returncode == 3
    assert runs[0].detail == "disk full"
    assert "RuntimeError: hook bug" in runs[1].detail
    assert hooks.failures == 3
    messages = [r.getMessage() for r in caplog.records]
    assert any("exit 3: disk full" in m for m in messages)
    assert any("hook bug" in m for m in messages)


async def test_hanging_shell_hook_is_killed_with_its_group_at_the_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    pidfile = tmp_path / "pid"
    hooks = Hooks("coordinator", timeout=0.5)
    # The shell stays the parent of `sleep`: both must go (the group is killed, not just sh).
    hooks.add("on_blocking_timeout", f"echo $$ > '{pidfile}'; sleep 30; echo never")
    started = anyio.current_time()
    with caplog.at_level(logging.WARNING, logger="streambus.hooks"):
        [run] = await hooks.fire("on_blocking_timeout", {"channel": "loop2-done"})
    elapsed = anyio.current_time() - started
    assert elapsed < 0.5 + 1
    assert run.status is HookStatus.TIMED_OUT
    await until_group_gone(int(pidfile.read_text()))
    assert hooks.timeouts == 1
    assert any("timed_out" in r.getMessage() for r in caplog.records)


async def test_hanging_hooks_run_concurrently_so_firing_costs_one_limit(tmp_path: Path
                                                                       ) -> None:
    release = threading.Event()
    hooks = Hooks("coordinator")
    hooks.add("on_signal_received", "sleep 30", timeout=0.5)
    hooks.add("on_signal_received", lambda event: release.wait(30), timeout=0.5)

    async def stuck(event: object) -> None:
        await anyio.sleep(30)

    hooks.add("on_signal_received", stuck, timeout=0.5)
    started = anyio.current_time()
    try:
        runs = await hooks.fire("on_signal_received", RECEIVED)
    finally:
        release.set()  # let the abandoned thread finish
    assert anyio.current_time() - started < 0.5 + 1
    assert [r.status for r in runs] == [HookStatus.TIMED_OUT] * 3


async def test_cancelling_the_caller_kills_a_running_hook(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    hooks = Hooks("coordinator", timeout=60)
    hooks.add("on_blocking_start", f"echo $$ > '{pidfile}'; sleep 30")
    with anyio.move_on_after(5) as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(hooks.fire, "on_blocking_start", STARTED)
            with anyio.fail_after(5):
                while True:  # the hook is running once it wrote its pid
                    if pidfile.exists() and pidfile.read_text().strip():
                        break
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert not scope.cancelled_caught
    await until_group_gone(int(pidfile.read_text()))


async def test_retry_handler_fires_the_hook_then_the_handler() -> None:
    order: list[str] = []
    hooks = Hooks("coordinator")
    hooks.add("on_retry_request", lambda request: order.append(f"hook {request.request_id}"))
    handler = hooks.retry_handler(lambda request: order.append(f"handler {request.request_id}"))
    await handler(RetryRequest(coordinator="coord-a", request_id="r1"))  # type: ignore[misc]
    assert order == ["hook r1", "handler r1"]


PROFILE = """
[agents.coordinator]
hook_timeout = "750ms"

[agents.coordinator.hooks]
on_signal_received = "cat > '{out}'"
on_peer_dead = {{ command = ["true"], timeout = 2 }}
on_blocking_start = ["true"]

[agents.validator.hooks]
on_retry_request = [{{ command = "exit 0" }}, {{ command = "exit 1", timeout = "3s" }}]
"""


async def test_profile_is_loaded_per_agent_type(tmp_path: Path) -> None:
    out = tmp_path / "from-profile.json"
    profile = tmp_path / "hooks.toml"
    profile.write_text(PROFILE.format(out=out))
    coordinator = Hooks.from_profile(profile, "coordinator", agent="coord-a")
    validator = Hooks.from_profile(profile, "validator")
    nobody = Hooks.from_profile(profile, "analyst")
    assert coordinator.timeout == 0.75
    assert {n: coordinator.configured(n) for n in HOOK_NAMES} == {
        "on_blocking_start": 1, "on_signal_received": 1, "on_blocking_timeout": 0,
        "on_peer_dead": 1, "on_retry_request": 0}
    assert validator.configured("on_retry_request") == 2
    assert validator.configured("on_signal_received") == 0
    assert all(nobody.configured(n) == 0 for n in HOOK_NAMES)
    await coordinator.fire("on_signal_received", RECEIVED)
    assert json.loads(out.read_text())["agent"] == "coord-a"
    runs = await validator.fire("on_retry_request",
                                RetryRequest(coordinator="v", request_id="r"))
    assert [(r.status, r.returncode) for r in runs] == [(HookStatus.OK, 0),
                                                        (HookStatus.FAILED, 1)]


@pytest.mark.parametrize(("text", "match"), [
    ('[agents.coordinator.hooks]\non_wait_forever = "true"', "unknown hook 'on_wait_forever'"),
    ('[agents.coordinator.hooks]\non_peer_dead = { cmd = "true" }', "'command'"),
    ('[agents.coordinator.hooks]\non_peer_dead = 3', "must be a table"),
    ('[agents.coordinator]\nhook_timeout = -1', "positive"),
    ('[agents.coordinator]\nretries = 2', "unknown keys"),
    ("[agents.coordinator\n", "cannot read hook profile"),
])
def test_bad_profiles_are_invalid_input(tmp_path: Path, text: str, match: str) -> None:
    profile = tmp_path / "bad.toml"
    profile.write_text(text)
    with pytest.raises(InvalidInput, match=match):
        Hooks.from_profile(profile, "coordinator")


async def test_unknown_hook_names_are_rejected() -> None:
    hooks = Hooks()
    with pytest.raises(InvalidInput, match="unknown hook 'on_finish'"):
        hooks.add("on_finish", "true")
    with pytest.raises(InvalidInput, match="unknown hook"):
        await hooks.fire("on_finish", RECEIVED)
    with pytest.raises(InvalidInput):
        hooks.add("on_peer_dead", "true", timeout=0)
    with pytest.raises(InvalidInput):
        hooks.add("on_peer_dead", [])


def test_missing_profile_is_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot read"):
        Hooks.from_profile(tmp_path / "absent.toml", "coordinator")


def test_helper_sees_its_own_process_group() -> None:
    # The liveness check the kill tests rely on must be able to see a live group.
    assert os.getpid() in group_alive(os.getpgid(0))
