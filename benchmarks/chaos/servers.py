"""The soak's servers and the faults done to them, plus the two machine-dependent faults.

Every server runs with AOF ``appendfsync always`` on a free port, started through
:mod:`streambus.testing`; every signal goes to a process this module started, by its pid.

* single: one server; SIGKILL then a restart from its AOF; SIGSTOP/SIGCONT.
* sentinel: a master, a replica, three sentinels; SIGKILL of the master then the failover (the
  old master comes back as a replica); SIGKILL and restart of the replica; a short SIGSTOP of
  the master (shorter than ``down-after-milliseconds``, so no failover).
* cluster: three masters with a replica each; the same three faults on the master of a swarm.

Link cuts need a network namespace (root, ``unshare -n`` and ``ip netns``): some worker
processes run in a namespace joined to the host by a veth pair, and the cut takes that link
down. Sentinel and cluster nodes announce 127.0.0.1 addresses, which a process in another
namespace cannot reach, so link cuts run on ``single`` only. Clock skew runs worker processes
under libfaketime (``LD_PRELOAD``, so the pid stays the Python process's).
"""

from __future__ import annotations

import glob
import os
import random
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Final

from streambus.testing import LocalCluster, LocalSentinelSet, ServerProcess, server_binaries

TOPOLOGIES: Final = ("single", "sentinel", "cluster")
HEALTHY_LIMIT_S: Final = 60.0
PROBE_LIMIT_S: Final = 2.0
SERVER_FAULTS: Final = {
    "single": ("server_kill", "server_freeze"),
    "sentinel": ("master_failover", "replica_kill", "master_freeze"),
    "cluster": ("master_failover", "replica_kill", "master_freeze"),
}
Fault = Callable[[random.Random, str], str]
"""A fault: blocks until it is over (the system may still be recovering); returns a detail."""


def faketime_library() -> Path | None:
    """libfaketime's preload library, where the Debian package ``faketime`` put it."""
    if shutil.which("faketime") is None:
        return None
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    return Path(found[0]) if found else None


def skewed_env(library: Path, offset: str) -> dict[str, str]:
    """Environment that shifts a child's clocks by ``offset`` (libfaketime syntax: ``+300s``)."""
    return {"LD_PRELOAD": str(library), "FAKETIME": offset, "FAKETIME_NO_CACHE": "1"}


class NetnsLink:
    """A network namespace joined to the host by a veth pair; :meth:`cut` takes it down."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.name = f"sbchaos{tag}"
        self.host_side = f"sbh{tag}"
        self.ns_side = f"sbn{tag}"
        octet = int(tag[:2], 16) % 250 + 1
        self.host_ip = f"10.213.{octet}.1"
        self.ns_ip = f"10.213.{octet}.2"
        self.ready = False

    @staticmethod
    def unavailable() -> str | None:
        """Why link cuts cannot run here, or None."""
        if os.geteuid() != 0:
            return "needs root"
        if shutil.which("unshare") is None or shutil.which("ip") is None:
            return "needs unshare and iproute2"
        probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False)
        if probe.returncode != 0:
            return f"unshare -n failed: {probe.stderr.decode().strip()}"
        return None

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def setup(self) -> None:
        self._ip("netns", "add", self.name)
        self.ready = True
        self._ip("link", "add", self.host_side, "type", "veth", "peer", "name", self.ns_side)
        self._ip("link", "set", self.ns_side, "netns", self.name)
        self._ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_side)
        self._ip("link", "set", self.host_side, "up")
        self._ip("netns", "exec", self.name, "ip", "addr", "add", f"{self.ns_ip}/30", "dev",
                 self.ns_side)
        self._ip("netns", "exec", self.name, "ip", "link", "set", self.ns_side, "up")
        self._ip("netns", "exec", self.name, "ip", "link", "set", "lo", "up")

    def prefix(self) -> list[str]:
        """The argv prefix that runs a command inside the namespace (it execs: same pid)."""
        return ["ip", "netns", "exec", self.name]

    def set_link(self, *, up: bool) -> None:
        self._ip("link", "set", self.host_side, "up" if up else "down")

    def teardown(self) -> None:
        if self.ready:
            subprocess.run(["ip", "link", "del", self.host_side], capture_output=True,
                           check=False)
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
            self.ready = False


class Servers:
    """The topology of one soak and its server faults (see the module docstring)."""

    def __init__(self, kind: str, directory: Path, link: NetnsLink | None) -> None:
        if kind not in TOPOLOGIES:
            raise ValueError(f"unknown topology {kind!r}")
        self.kind = kind
        self.link = link
        binary = server_binaries()["valkey"]
        self.single: ServerProcess | None = None
        self.sentinel: LocalSentinelSet | None = None
        self.cluster: LocalCluster | None = None
        self.pending_restart: ServerProcess | None = None
        """A master replaced by a failover, restarted (as a replica) after the fault."""
        if kind == "single":
            extra = ([f"bind 127.0.0.1 {link.host_ip}", "protected-mode no"]
                     if link is not None else [])
            self.single = ServerProcess(binary, directory / "server", appendonly=True,
                                        config=extra)
        elif kind == "sentinel":
            self.sentinel = LocalSentinelSet(directory / "sentinel", binary, appendonly=True)
        else:
            self.cluster = LocalCluster(directory / "cluster", binary, appendonly=True)

    def __repr__(self) -> str:
        running = self.single or self.sentinel or self.cluster
        return f"<Servers {self.kind} {running!r}>"

    def start(self) -> None:
        if self.single is not None:
            self.single.start()
        elif self.sentinel is not None:
            self.sentinel.start()
        elif self.cluster is not None:
            self.cluster.start()

    def stop(self) -> None:
        for running in (self.single, self.sentinel, self.cluster):
            if running is not None:
                running.stop()

    @property
    def url(self) -> str:
        running = self.single or self.sentinel or self.cluster
        assert running is not None
        return running.url

    def netns_url(self) -> str | None:
        """The URL a process in the link's namespace uses (single only)."""
        if self.single is None or self.link is None:
            return None
        return f"redis://{self.link.host_ip}:{self.single.port}/0"

    def faults(self) -> dict[str, Fault]:
        """The server faults of this topology, by kind (:data:`SERVER_FAULTS`)."""
        every: dict[str, Fault] = {
            "server_kill": self._kill_single, "server_freeze": self._freeze_single,
            "master_failover": self._failover, "replica_kill": self._kill_replica,
            "master_freeze": self._freeze_master}
        return {kind: every[kind] for kind in SERVER_FAULTS[self.kind]}

    def masters(self, keys: list[str]) -> list[ServerProcess]:
        """Who is master now (the master of each key on a cluster)."""
        if self.sentinel is not None:
            return [self.sentinel.master()]
        if self.cluster is not None:
            return [self.cluster.master_of(key) for key in keys]
        assert self.single is not None
        return [self.single]

    def probe(self, keys: list[str]) -> tuple[int, ...]:
        """The masters' ports, once each has answered a PING (raises when one cannot)."""
        found = self.masters(keys)
        for node in {node.port: node for node in found}.values():
            with node.client(timeout=PROBE_LIMIT_S) as client:
                client.ping()
        return tuple(node.port for node in found)

    def wait_healthy(self) -> None:
        if self.sentinel is not None:
            self.sentinel.wait_healthy(HEALTHY_LIMIT_S)
        elif self.cluster is not None:
            self.cluster.wait_healthy(HEALTHY_LIMIT_S)
        elif self.single is not None and not self.single.alive:
            if self.single.frozen:
                self.single.thaw()
            else:
                self.single.start()

    # -- single ---------------------------------------------------------------------------------

    def _kill_single(self, rng: random.Random, key: str) -> str:
        assert self.single is not None
        self.single.kill()
        down = rng.uniform(0.05, 0.5)
        time.sleep(down)
        self.single.start()  # same port, same AOF; returns once it answers
        return f"down {down:.2f} s before the restart"

    def _freeze_single(self, rng: random.Random, key: str) -> str:
        assert self.single is not None
        frozen = rng.uniform(0.2, 2.5)
        self.single.freeze()
        try:
            time.sleep(frozen)
        finally:
            self.single.thaw()
        return f"frozen {frozen:.2f} s"

    # -- sentinel and cluster -------------------------------------------------------------------

    def _master_of(self, key: str) -> ServerProcess:
        if self.cluster is not None:
            return self.cluster.master_of(key)
        assert self.sentinel is not None
        return self.sentinel.master()

    def _failover(self, rng: random.Random, key: str) -> str:
        """SIGKILL the master; return once a replica serves in its place. The old master is
        restarted (as a replica) after, outside the fault window."""
        old = self._master_of(key)
        began = time.monotonic()
        if self.cluster is not None:
            self.cluster.kill(old)
            self.cluster.wait_failover(old, HEALTHY_LIMIT_S)
        else:
            assert self.sentinel is not None
            old.kill()
            self.sentinel.wait_failover(old, HEALTHY_LIMIT_S)
        took = time.monotonic() - began
        self.pending_restart = old
        return f"master :{old.port} killed, replaced in {took:.2f} s"

    def after_fault(self) -> None:
        """Bring back what a fault left down (a replaced master, as a replica); wait until
        the topology is healthy, so every fault starts from a healthy system."""
        node, self.pending_restart = self.pending_restart, None
        if node is not None:
            if self.cluster is not None:
                self.cluster.restart(node, HEALTHY_LIMIT_S)
            elif self.sentinel is not None:
                self.sentinel.restart(node, HEALTHY_LIMIT_S)
        self.wait_healthy()

    def _kill_replica(self, rng: random.Random, key: str) -> str:
        if self.cluster is not None:
            node = rng.choice(self.cluster.replicas_of(self.cluster.master_of(key)))
        else:
            assert self.sentinel is not None
            node = rng.choice(self.sentinel.replicas())
        node.kill()
        down = rng.uniform(0.1, 0.5)
        time.sleep(down)
        if self.sentinel is not None:
            self.sentinel.restart(node, HEALTHY_LIMIT_S)  # as a replica of the master now
        else:
            node.start()
        return f"replica :{node.port} down {down:.2f} s"

    def _freeze_master(self, rng: random.Random, key: str) -> str:
        node = self._master_of(key)
        frozen = rng.uniform(0.2, 0.5)  # under the 1 s failure detection: no failover
        node.freeze()
        try:
            time.sleep(frozen)
        finally:
            node.thaw()
        return f"master :{node.port} frozen {frozen:.2f} s"
