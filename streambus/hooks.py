"""Lifecycle hooks: run Python callables or shell commands when a coordinator's wait moves.

Hooks: ``on_blocking_start``, ``on_signal_received``, ``on_blocking_timeout``, ``on_peer_dead``,
``on_retry_request``. Each may have Python callables (:meth:`Hooks.add`) and shell commands,
configured per agent type in a TOML profile (:meth:`Hooks.from_profile`)::

    [agents.coordinator]
    hook_timeout = 5                      # this type's default limit (seconds or "500ms")

    [agents.coordinator.hooks]
    on_signal_received = "jq .event >> /var/log/signals.jsonl"
    on_peer_dead = { command = ["page-oncall", "--team", "swarm"], timeout = "2s" }

A command gets one JSON object on stdin, ``{"hook", "agent_type", "agent", "event"}``, where
``event`` is the streambus event as :func:`streambus.schema.encode` writes it (or the mapping the
caller passed), and ``STREAMBUS_HOOK`` / ``STREAMBUS_AGENT_TYPE`` in its environment. A string
runs through ``/bin/sh -c``; a list runs as argv, with no shell.

**A hook never breaks or stalls the wait.** Every hook runs under its own time limit (default
10 s): a command still running at its limit is killed with its whole process group (it runs in
a session of its own, so ``sh -c 'a | b'`` leaves no orphans); an exception or a non-zero exit is
logged and reported, never raised. The hooks of one name run concurrently, so firing costs at
most the longest limit. Sync callables run in a worker thread, so a blocking one cannot freeze
the event loop; Python cannot kill a thread, so one still running at its limit is abandoned
(logged), and hook threads share a small limiter of their own so abandoned threads cannot starve
other ``to_thread`` work in the process. An async callable runs in the caller's task and is
cancelled at its limit; one that blocks the event loop is beyond any limit's reach.
"""

from __future__ import annotations

import enum
import inspect
import logging
import os
import signal
import subprocess
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.abc
import msgspec

from streambus.config import parse_duration
from streambus.errors import InvalidInput
from streambus.retries import RetryHandler
from streambus.schema import Event, RetryRequest

log = logging.getLogger(__name__)

HOOK_NAMES: Final = ("on_blocking_start", "on_signal_received", "on_blocking_timeout",
                     "on_peer_dead", "on_retry_request")
DEFAULT_HOOK_TIMEOUT_S: Final = 10.0
_STDERR_TAIL: Final = 2048
_DRAIN_GRACE_S: Final = 0.2
"""After a command exits, how long its stderr may still be read (a grandchild can hold it)."""
_REAP_LIMIT_S: Final = 2.0
_HOOK_THREADS: Final = 8

HookCallable = Callable[[Any], object]
"""Called with the event the hook fired for (a streambus ``Event`` or a mapping); what it
returns is ignored, except that an awaitable is awaited."""
HookEvent = Event | Mapping[str, Any]


class HookStatus(enum.StrEnum):
    OK = "ok"
    FAILED = "failed"
    TIMED_OUT = "timed_out"


@dataclass(frozen=True, slots=True)
class HookRun:
    """How one hook ran: what it was, how it ended, how long it took."""

    hook: str
    target: str
    status: HookStatus
    elapsed: float
    returncode: int | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class _Hook:
    action: HookCallable | str | tuple[str, ...]
    timeout: float | None

    @property
    def target(self) -> str:
        if callable(self.action):
            return getattr(self.action, "__qualname__", repr(self.action))
        return self.action if isinstance(self.action, str) else " ".join(self.action)


def check_hook_name(name: str) -> str:
    if name not in HOOK_NAMES:
        raise InvalidInput(f"unknown hook {name!r}: use one of {', '.join(HOOK_NAMES)}")
    return name


class Hooks:
    """The hooks of one agent type. :meth:`fire` runs those of one name, time-limited."""

    def __init__(self, agent_type: str = "", *, agent: str = "",
                 timeout: float = DEFAULT_HOOK_TIMEOUT_S) -> None:
        self.agent_type = agent_type
        self.agent = agent
        self.timeout = _positive(timeout, "hook timeout")
        self._hooks: dict[str, list[_Hook]] = {name: [] for name in HOOK_NAMES}
        self._limiter: anyio.CapacityLimiter | None = None
        self.runs = 0
        self.failures = 0
        self.timeouts = 0

    def __repr__(self) -> str:
        configured = {n: len(h) for n, h in self._hooks.items() if h}
        return (f"<Hooks agent_type={self.agent_type!r} {configured} runs={self.runs} "
                f"failures={self.failures} timeouts={self.timeouts}>")

    def add(self, name: str, hook: HookCallable | str | Sequence[str], *,
            timeout: float | None = None) -> None:
        """Run ``hook`` (a callable, a shell command, or an argv list) when ``name`` fires."""
        check_hook_name(name)
        if timeout is not None:
            _positive(timeout, "hook timeout")
        if callable(hook) or isinstance(hook, str):
            action: HookCallable | str | tuple[str, ...] = hook
        else:
            action = tuple(hook)
            if not action or not all(isinstance(a, str) for a in action):
                raise InvalidInput(f"hook {name!r}: a command list must be non-empty strings")
        if isinstance(action, str) and not action.strip():
            raise InvalidInput(f"hook {name!r}: empty command")
        self._hooks[name].append(_Hook(action, timeout))

    def configured(self, name: str) -> int:
        """How many hooks run when ``name`` fires."""
        return len(self._hooks[check_hook_name(name)])

    async def fire(self, name: str, event: HookEvent) -> tuple[HookRun, ...]:
        """Run every hook of ``name`` concurrently, each within its limit; never raises for a
        hook's failure (cancellation of the caller still propagates, after killing commands)."""
        hooks = self._hooks[check_hook_name(name)]
        if not hooks:
            return ()
        runs: list[HookRun | None] = [None] * len(hooks)

        async def run(index: int, hook: _Hook) -> None:
            runs[index] = await self._run(name, hook, event)

        async with anyio.create_task_group() as tg:
            for index, hook in enumerate(hooks):
                tg.start_soon(run, index, hook)
        return tuple(r for r in runs if r is not None)

    def retry_handler(self, handler: RetryHandler | None = None) -> RetryHandler:
        """A retry handler that fires ``on_retry_request``, then runs ``handler`` (if any)."""

        async def handle(request: RetryRequest) -> None:
            await self.fire("on_retry_request", request)
            if handler is not None:
                result = handler(request)
                if inspect.isawaitable(result):
                    await result

        return handle

    # -- running -------------------------------------------------------------------------------

    async def _run(self, name: str, hook: _Hook, event: HookEvent) -> HookRun:
        limit = hook.timeout or self.timeout
        started = anyio.current_time()
        try:
            if callable(hook.action):
                status, code, detail = await self._call(hook.action, event, limit)
            else:
                status, code, detail = await self._command(name, hook.action, event, limit)
        except Exception as exc:  # a hook's own failure is reported, never raised
            status, code, detail = HookStatus.FAILED, None, f"{type(exc).__name__}: {exc}"
        run = HookRun(name, hook.target, status, anyio.current_time() - started, code, detail)
        self._record(run)
        return run

    def _record(self, run: HookRun) -> None:
        self.runs += 1
        if run.status is HookStatus.OK:
            log.debug("hook %s (%s) ran in %.3f s", run.hook, run.target, run.elapsed)
            return
        if run.status is HookStatus.TIMED_OUT:
            self.timeouts += 1
        else:
            self.failures += 1
        log.warning("hook %s of %s (%s) %s after %.3f s%s%s", run.hook,
                    self.agent_type or "agent", run.target, run.status, run.elapsed,
                    f", exit {run.returncode}" if run.returncode is not None else "",
                    f": {run.detail}" if run.detail else "",
                    extra={"event": "hook_failed", "hook": run.hook, "status": str(run.status),
                           "target": run.target, "returncode": run.returncode})

    async def _call(self, function: HookCallable, event: HookEvent, limit: float
                    ) -> tuple[HookStatus, int | None, str]:
        with anyio.move_on_after(limit) as scope:
            if _is_async(function):
                result = function(event)
            else:
                if self._limiter is None:
                    self._limiter = anyio.CapacityLimiter(_HOOK_THREADS)
                result = await anyio.to_thread.run_sync(
                    function, event, abandon_on_cancel=True, limiter=self._limiter)
            if inspect.isawaitable(result):
                await result
        if scope.cancelled_caught:
            return HookStatus.TIMED_OUT, None, f"still running after {limit} s; abandoned"
        return HookStatus.OK, None, ""

    async def _command(self, name: str, command: str | tuple[str, ...], event: HookEvent,
                       limit: float) -> tuple[HookStatus, int | None, str]:
        stdin = self.stdin_for(name, event)
        env = {**os.environ, "STREAMBUS_HOOK": name, "STREAMBUS_AGENT_TYPE": self.agent_type}
        tail = bytearray()
        process: anyio.abc.Process | None = None
        code: int | None = None
        try:
            with anyio.move_on_after(limit):
                # Shielded: cancelled mid-spawn, asyncio kills only the direct child, and a
                # grandchild it already forked would escape. Once we hold the process, the
                # ``finally`` below kills the whole group.
                with anyio.CancelScope(shield=True):
                    process = spawned = await anyio.open_process(
                        command if isinstance(command, str) else list(command),
                        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE, env=env, start_new_session=True)
                await _converse(spawned, stdin, tail)
        finally:
            if process is not None:
                code = process.returncode  # None: still running at its limit (or cancelled)
                await _reap(process)
        text = tail.decode(errors="replace").strip()
        if code is None:
            return HookStatus.TIMED_OUT, None, f"killed after {limit} s" + (
                f"; stderr: {text}" if text else "")
        if code != 0:
            return HookStatus.FAILED, code, text
        return HookStatus.OK, 0, ""

    def stdin_for(self, name: str, event: HookEvent) -> bytes:
        """The JSON a command hook reads on stdin."""
        body = msgspec.to_builtins(event) if isinstance(event, Event) else dict(event)
        return msgspec.json.encode({"hook": name, "agent_type": self.agent_type,
                                    "agent": self.agent, "event": body})

    # -- profiles ------------------------------------------------------------------------------

    @classmethod
    def from_profile(cls, path: str | os.PathLike[str], agent_type: str, *, agent: str = "",
                     timeout: float = DEFAULT_HOOK_TIMEOUT_S) -> Hooks:
        """The hooks ``[agents.<agent_type>.hooks]`` of a TOML profile declares (none if the
        profile does not mention the type)."""
        source = Path(path)
        try:
            profile = tomllib.loads(source.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise InvalidInput(f"cannot read hook profile {str(source)!r}: {exc}") from None
        return cls.from_mapping(profile, agent_type, agent=agent, timeout=timeout,
                                source=str(source))

    @classmethod
    def from_mapping(cls, profile: Mapping[str, Any], agent_type: str, *, agent: str = "",
                     timeout: float = DEFAULT_HOOK_TIMEOUT_S, source: str = "profile") -> Hooks:
        """Like :meth:`from_profile`, from an already parsed profile."""
        agents = _table(profile.get("agents", {}), f"{source}: [agents]")
        section = _table(agents.get(agent_type, {}), f"{source}: [agents.{agent_type}]")
        where = f"{source}: [agents.{agent_type}]"
        unknown = set(section) - {"hooks", "hook_timeout"}
        if unknown:
            raise InvalidInput(f"{where}: unknown keys {sorted(unknown)}")
        if "hook_timeout" in section:
            timeout = _duration(section["hook_timeout"], f"{where} hook_timeout")
        hooks = cls(agent_type, agent=agent, timeout=timeout)
        for name, spec in _table(section.get("hooks", {}), f"{where}.hooks").items():
            if name not in HOOK_NAMES:
                raise InvalidInput(f"{where}.hooks: unknown hook {name!r}: use one of "
                                   f"{', '.join(HOOK_NAMES)}")
            for command, limit in _commands(spec, f"{where}.hooks.{name}"):
                hooks.add(name, command, timeout=limit)
        return hooks


def _is_async(function: HookCallable) -> bool:
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(
        getattr(function, "__call__", None))  # noqa: B004 - an object with an async __call__


async def _converse(process: anyio.abc.Process, stdin: bytes, tail: bytearray) -> None:
    """Feed stdin, keep the tail of stderr, and wait for the exit."""
    drained = anyio.Event()

    async def feed() -> None:
        assert process.stdin is not None
        try:
            await process.stdin.send(stdin)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # the hook exited without reading its stdin: its right
        finally:
            await process.stdin.aclose()

    async def drain() -> None:
        assert process.stderr is not None
        async for chunk in process.stderr:
            tail.extend(chunk)
            del tail[:-_STDERR_TAIL]
        drained.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(feed)
        tg.start_soon(drain)
        await process.wait()
        with anyio.move_on_after(_DRAIN_GRACE_S):
            await drained.wait()
        tg.cancel_scope.cancel()


async def _reap(process: anyio.abc.Process) -> None:
    """Kill the hook's process group if it still runs, and wait for it (bounded, shielded)."""
    if process.returncode is None:
        try:
            if hasattr(os, "killpg"):
                # start_new_session made the hook a group leader: its pid is the group id.
                os.killpg(process.pid, signal.SIGKILL)
            else:  # pragma: no cover - no process groups on this platform
                process.kill()
        except (ProcessLookupError, PermissionError):
            pass
    with anyio.CancelScope(shield=True), anyio.move_on_after(_REAP_LIMIT_S):
        await process.aclose()


def _commands(spec: Any, where: str) -> list[tuple[str | list[str], float | None]]:
    """A hook's command(s): a string, an argv list, a ``{command, timeout}`` table, or a list
    of those tables."""
    if isinstance(spec, str) or (isinstance(spec, list) and all(isinstance(s, str)
                                                                for s in spec)):
        return [(spec, None)]
    if isinstance(spec, list):
        return [item for entry in spec for item in _commands(entry, where)]
    table = _table(spec, where)
    if set(table) - {"command", "timeout"} or "command" not in table:
        raise InvalidInput(f"{where}: a hook table has 'command' and optional 'timeout'")
    command = table["command"]
    if not (isinstance(command, str) or (isinstance(command, list)
                                         and all(isinstance(c, str) for c in command))):
        raise InvalidInput(f"{where}: command must be a string or a list of strings")
    limit = _duration(table["timeout"], f"{where} timeout") if "timeout" in table else None
    return [(command, limit)]


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{where} must be a table")
    return value


def _duration(value: Any, where: str) -> float:
    if isinstance(value, str):
        return _positive(parse_duration(value), where)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{where} must be seconds or a duration string, not {value!r}")
    return _positive(float(value), where)


def _positive(value: float, what: str) -> float:
    if not value > 0:
        raise InvalidInput(f"{what} must be positive, not {value!r}")
    return value
