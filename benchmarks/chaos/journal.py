"""The soak's history on disk: one append-only JSON-lines journal per coordinator.

Every line is one ``write(2)`` on an ``O_APPEND`` file, so a coordinator killed with SIGKILL
leaves whole lines or none, and the incarnations of one coordinator (each restart is a new
process under the same id) append to the same file in order. Lines carry the writer's pid and
incarnation number (pids are reused): the checker tells incarnations apart by them. Times in
lines are *server* times (stream ids, ``TIME``), never the writer's clock, which may be skewed
on purpose.

Kinds: ``start``; ``begin`` (channel, requested iteration, server time before the wait, its
timeout); then one of ``recv`` (the Delivery: signal, stream id, ACK id, iteration),
``timeout`` (the server-time deadline and the server time just after), ``cancelled``,
``unavailable`` or ``error``; ``drained`` once every channel's end marker was received.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

ENDINGS: Final = frozenset({"recv", "timeout", "cancelled", "unavailable", "error"})


class Journal:
    """The append side (one per coordinator and process)."""

    def __init__(self, path: Path, coordinator: str, incarnation: int) -> None:
        self.path = path
        self.coordinator = coordinator
        self.incarnation = incarnation
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._pid = os.getpid()

    def write(self, kind: str, **fields: Any) -> None:
        line = {"k": kind, "c": self.coordinator, "pid": self._pid, "inc": self.incarnation,
                **fields}
        os.write(self._fd, (json.dumps(line, separators=(",", ":")) + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)


@dataclass(frozen=True, slots=True)
class Line:
    kind: str
    coordinator: str
    pid: int
    incarnation: int
    fields: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)


def read_journal(path: Path) -> list[Line]:
    """Every whole line of a journal (a torn last line, impossible with one write, is
    dropped rather than trusted)."""
    if not path.exists():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            raw = json.loads(text)
        except json.JSONDecodeError:
            continue
        kind, coordinator = raw.pop("k"), raw.pop("c")
        lines.append(Line(kind, coordinator, raw.pop("pid"), raw.pop("inc"), raw))
    return lines


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a restarted coordinator picks up: its open wait, if any, and its next iteration."""

    channel: str | None
    iteration: int
    next_iteration: int


def resume_point(lines: list[Line]) -> Resume:
    """A wait begun and never ended (its process died in it) is waited for again, on the same
    channel and, for coordinators that number their iterations, with the same iteration: a
    signal the dead wait received is then returned again, not skipped."""
    last_begin: Line | None = None
    highest = 0
    for line in lines:
        highest = max(highest, int(line.get("it") or 0))
        if line.kind == "begin":
            last_begin = line
        elif line.kind in ENDINGS and line.kind != "cancelled":
            last_begin = None
    if last_begin is None:
        return Resume(None, 0, highest + 1)
    return Resume(last_begin["ch"], int(last_begin["it"]), highest + 1)


def waits(lines: list[Line]) -> Iterator[tuple[Line, Line | None]]:
    """Each ``begin`` with the line that ended it in the same incarnation (``None``: the
    incarnation died in that wait)."""
    open_waits: dict[int, Line] = {}
    for line in lines:
        if line.kind == "begin":
            if (dead := open_waits.pop(line.incarnation, None)) is not None:
                yield dead, None
            open_waits[line.incarnation] = line
        elif line.kind in ENDINGS and (begun := open_waits.pop(line.incarnation, None)):
            yield begun, line
    yield from ((begun, None) for begun in open_waits.values())
