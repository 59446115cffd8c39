"""Child processes of a benchmark, and the line protocol both sides speak.

The parent starts ``python -m benchmarks.worker ROLE ARGS_JSON`` in a session of its own. Both
directions carry one JSON object per line: commands on the child's stdin, events on its stdout
(stderr passes through for tracebacks). A child stops when its stdin closes, which also happens
when the parent dies; :class:`ChildGroup` closes every stdin on the way out, waits a grace period,
then kills what is left, whatever the reason for leaving (an error, Ctrl-C, a cancel).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Final

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from benchmarks.common import REPO_ROOT, STOP_GRACE_S, BenchmarkError

MAX_LINE: Final = 1 << 24
URL_ENV: Final = "STREAMBUS_BENCH_URL"


class Child:
    """One child process: send it commands, receive its events in order."""

    def __init__(self, name: str, process: anyio.abc.Process) -> None:
        self.name = name
        self.process = process
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](1 << 16)
        self._events_in: MemoryObjectSendStream[dict[str, Any]] = send
        self._events: MemoryObjectReceiveStream[dict[str, Any]] = receive

    def __repr__(self) -> str:
        return f"<Child {self.name} pid={self.process.pid} rc={self.process.returncode}>"

    async def send(self, command: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        try:
            await self.process.stdin.send(json.dumps(command).encode() + b"\n")
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            raise BenchmarkError(f"{self.name} is gone (exit code "
                                 f"{self.process.returncode})") from None

    async def receive(self, timeout: float, what: str = "an event") -> dict[str, Any]:
        """The child's next event; a child that exits or stays silent is an error."""
        with anyio.move_on_after(timeout):
            try:
                return await self._events.receive()
            except anyio.EndOfStream:
                code = await self.process.wait()
                raise BenchmarkError(f"{self.name} exited with code {code} while the harness "
                                     f"waited for {what} (see its stderr above)") from None
        raise BenchmarkError(f"{self.name} sent no {what} within {timeout:.0f} s")

    async def expect(self, event: str, timeout: float, **match: Any) -> dict[str, Any]:
        """The next event, which must be ``event`` (with ``match`` fields) or an error."""
        got = await self.receive(timeout, what=f"{event!r}")
        if got.get("event") == "error":
            raise BenchmarkError(f"{self.name}: {got.get('message')}")
        if got.get("event") != event or any(got.get(k) != v for k, v in match.items()):
            raise BenchmarkError(f"{self.name}: expected {event!r} {match}, got {got}")
        return got

    async def pump(self) -> None:
        """Parse stdout lines into events until the child closes it."""
        assert self.process.stdout is not None
        lines = BufferedByteReceiveStream(self.process.stdout)
        async with self._events_in:
            with contextlib.suppress(anyio.IncompleteRead, anyio.EndOfStream,
                                     anyio.ClosedResourceError, anyio.BrokenResourceError):
                while True:
                    line = await lines.receive_until(b"\n", MAX_LINE)
                    await self._events_in.send(json.loads(line))

    async def close_stdin(self) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(Exception):
                await self.process.stdin.aclose()


class ChildGroup:
    """Children started together and always stopped together (see the module docstring)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.children: list[Child] = []
        self._tg: anyio.abc.TaskGroup | None = None
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> ChildGroup:
        self._tg = await self._stack.enter_async_context(anyio.create_task_group())
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool | None:
        with anyio.CancelScope(shield=True):
            await self.stop()
        return await self._stack.__aexit__(exc_type, exc, tb)

    async def spawn(self, role: str, args: dict[str, Any], name: str) -> Child:
        """Start ``python -m benchmarks.worker role args`` and collect its events."""
        assert self._tg is not None, "use ChildGroup as an async context manager"
        command = [sys.executable, "-m", "benchmarks.worker", role, json.dumps(args)]
        process = await anyio.open_process(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
            cwd=REPO_ROOT, env={**os.environ, URL_ENV: self.url}, start_new_session=True,
        )
        child = Child(name, process)
        self.children.append(child)
        self._tg.start_soon(child.pump)
        return child

    async def broadcast(self, command: dict[str, Any]) -> None:
        for child in self.children:
            await child.send(command)

    async def gather(self, event: str, timeout: float, **match: Any) -> list[dict[str, Any]]:
        """One ``event`` from every child (each child's events arrive in order)."""
        deadline = anyio.current_time() + timeout
        return [await child.expect(event, max(0.1, deadline - anyio.current_time()), **match)
                for child in self.children]

    async def stop(self) -> None:
        """Close every stdin, give the children a grace period, then kill the rest."""
        for child in self.children:
            await child.close_stdin()
        with anyio.move_on_after(STOP_GRACE_S):
            for child in self.children:
                await child.process.wait()
        for child in self.children:
            if child.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                await child.process.wait()
            await child.process.aclose()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()


# -- the child's side --------------------------------------------------------------------------


def emit(event: str, **fields: Any) -> None:
    """Send one event to the parent (one JSON line on stdout)."""
    sys.stdout.write(json.dumps({"event": event, **fields}, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def commands(scope: anyio.CancelScope) -> AsyncIterator[dict[str, Any]]:
    """The parent's commands; on EOF (the parent stopped us, or died) cancel ``scope``."""
    fd = sys.stdin.fileno()
    buffer = b""
    while True:
        await anyio.wait_readable(fd)
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            scope.cancel()
            return
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                yield json.loads(line)


def child_url() -> str:
    return os.environ[URL_ENV]


def require(args: dict[str, Any], names: Sequence[str]) -> None:
    missing = [n for n in names if n not in args]
    if missing:
        raise SystemExit(f"worker: missing arguments {missing}")
