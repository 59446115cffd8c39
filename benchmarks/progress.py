"""Progress while the harness runs: rich bars on a terminal, plain lines anywhere else (CI)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)


class Reporter:
    """An overall bar (workloads' steps) and one bar for the workload that runs now."""

    def __init__(self, total_steps: int, *, quiet: bool = False) -> None:
        self.console = Console(stderr=True, highlight=False)
        self.live = self.console.is_terminal and not quiet
        self.quiet = quiet
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("{task.fields[note]}"),
            console=self.console, disable=not self.live, transient=False,
        )
        self._overall = self._progress.add_task("all workloads", total=total_steps, note="")
        self._current: TaskID | None = None
        self._title = ""
        self._started = time.monotonic()

    def __enter__(self) -> Reporter:
        self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.stop()

    @contextlib.contextmanager
    def workload(self, title: str, steps: int) -> Iterator[None]:
        """A bar for one workload of ``steps`` steps, removed when it ends."""
        self._title = title
        self._current = self._progress.add_task(f"  {title}", total=max(1, steps), note="")
        self.log(f"{title}: started ({steps} steps)")
        try:
            yield
        finally:
            self._progress.remove_task(self._current)
            self._current = None

    def advance(self, note: str = "", steps: int = 1) -> None:
        """One step done; ``note`` says what it measured (shown, or logged off a terminal)."""
        self._progress.update(self._overall, advance=steps)
        if self._current is not None:
            self._progress.update(self._current, advance=steps, note=note)
        if note and not self.live and not self.quiet:
            self.log(f"{self._title}: {note}")

    def log(self, message: str) -> None:
        if self.quiet:
            return
        elapsed = time.monotonic() - self._started
        if self.live:
            self._progress.console.print(f"[{elapsed:6.1f}s] {message}", markup=False)
        else:
            print(f"[{elapsed:6.1f}s] {message}", file=self.console.file, flush=True)
