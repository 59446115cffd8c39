"""The soak's coordinators: worker processes (killed, frozen, restarted) and in-process loops.

Each worker process belongs to the :class:`Fleet` that started it and is only ever signalled
by its pid. Every incarnation is a :class:`Life` (pid, wall-clock start and end, fate), which
the checker uses to tell a coordinator killed right after an ACK from one that lived on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.chaos.coordinator import CoordinatorSpec
from benchmarks.common import REPO_ROOT


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    name: str
    swarm: str
    coordinators: tuple[CoordinatorSpec, ...]
    in_netns: bool = False
    skew: str | None = None
    """A libfaketime offset (``+300s``) for the process's clocks, or None."""


@dataclass
class Life:
    """One incarnation (OS process) of a worker."""

    worker: str
    incarnation: int
    pid: int
    started: float
    ended: float | None = None
    fate: str = "running"


@dataclass
class Fleet:
    """Worker processes: started, killed -9, frozen, restarted; all reaped by :meth:`close`."""

    specs: dict[str, WorkerSpec]
    url: str
    netns_url: str | None
    netns_prefix: list[str]
    skew_env: dict[str, dict[str, str]]
    namespace: str
    directory: Path
    drain_flag: Path
    lives: list[Life] = field(default_factory=list)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    current: dict[str, Life] = field(default_factory=dict)
    incarnations: dict[str, int] = field(default_factory=dict)

    def _command(self, spec: WorkerSpec, incarnation: int) -> list[str]:
        args = {
            "url": self.netns_url if spec.in_netns else self.url,
            "namespace": self.namespace, "journals": str(self.directory),
            "drain_flag": str(self.drain_flag), "incarnation": incarnation,
            "parent": os.getpid(),
            "coordinators": [vars_of(c) for c in spec.coordinators],
        }
        prefix = self.netns_prefix if spec.in_netns else []
        return [*prefix, sys.executable, "-m", "benchmarks.chaos.worker", json.dumps(args)]

    def start(self, name: str) -> None:
        spec = self.specs[name]
        incarnation = self.incarnations[name] = self.incarnations.get(name, 0) + 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMBUS_")}
        env["STREAMBUS_HOME"] = str(self.directory / "streambus-home")  # never a user's server
        if spec.skew is not None:
            env.update(self.skew_env.get(spec.skew, {}))
        with (self.directory / f"{name}.stderr").open("ab") as err:
            process = subprocess.Popen(self._command(spec, incarnation), cwd=REPO_ROOT,
                                       stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                       env=env)
        self.processes[name] = process
        life = Life(name, incarnation, process.pid, time.time())
        self.lives.append(life)
        self.current[name] = life

    def _end(self, name: str, fate: str) -> None:
        self.processes[name].wait()
        life = self.current[name]
        life.ended = time.time()
        life.fate = fate

    def kill(self, name: str) -> None:
        """SIGKILL the worker (as a crash or the OOM killer would)."""
        process = self.processes[name]
        if (code := process.poll()) is not None:
            self._end(name, f"crashed rc={code}")
            return
        process.kill()
        self._end(name, "killed")

    def freeze(self, name: str) -> None:
        os.kill(self.processes[name].pid, signal.SIGSTOP)

    def thaw(self, name: str) -> None:
        os.kill(self.processes[name].pid, signal.SIGCONT)

    def revive_dead(self) -> list[str]:
        """Restart every worker whose process exited on its own (a crash: recorded)."""
        crashed = []
        for name, process in list(self.processes.items()):
            life = self.current[name]
            if life.ended is None and (code := process.poll()) is not None:
                self._end(name, f"crashed rc={code}")
                crashed.append(name)
                self.start(name)
        return crashed

    def close(self) -> None:
        for name, process in self.processes.items():
            if self.current[name].ended is None:
                process.kill()
                self._end(name, "stopped")

    @property
    def crashes(self) -> list[Life]:
        return [life for life in self.lives if life.fate.startswith("crashed")]

    def life_of(self, worker: str, incarnation: int) -> Life | None:
        return next((life for life in self.lives
                     if life.worker == worker and life.incarnation == incarnation), None)


def vars_of(spec: CoordinatorSpec) -> dict[str, object]:
    return {name: getattr(spec, name) for name in CoordinatorSpec.__slots__}
