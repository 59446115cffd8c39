"""A throwaway Redis Cluster of real processes: 3 masters, each with a replica, on free ports.

No redis-cli and no Docker: the nodes are wired the way ``redis-cli --cluster create`` does
it, with plain commands. Each node gets ``CLUSTER SET-CONFIG-EPOCH i`` while it still knows
nobody (distinct epochs, so no epoch-collision round on start), node 0 sends ``CLUSTER MEET``
to the others, each master takes one third of the slots with ``CLUSTER ADDSLOTSRANGE``, and
once every node lists every other one, each replica is given its master with
``CLUSTER REPLICATE`` (retried: a node learns the master's id by gossip, and until then the
command fails with "Unknown node").

Each node's cluster bus listens on a port of its own (``cluster-port``), because a free
client port above 55535 has no ``port + 10000``. ``cluster-node-timeout`` is 1000 ms (a dead
master is declared failed after about a second), ``repl-diskless-sync-delay 0`` (a replica's
first sync starts at once instead of after 5 s; Redis 7.0 needs it as Valkey does) and
``repl-ping-replica-period 1`` (Redis 7.0 hides a replica from ``CLUSTER SLOTS`` until its
replication offset moves, which on an idle master is the first replication PING).

Measured on this project's shared 2-core machine (load average 4-8 from other work), five
runs each, median (min-max):

================  =====================  ================================================
binary            ``start()``            ``kill_master_of`` until ``wait_failover`` returns
================  =====================  ================================================
Valkey 9.1.2      2.15 s (2.10-2.18)     1.7 s (1.4-2.0)
Redis 7.0.15      2.20 s (2.12-2.50)     2.5 s (2.3-3.0)
================  =====================  ================================================

Start-up is bounded below by the servers, not by the wiring (done in about 0.2 s): a master
reports ``cluster_state:ok`` no sooner than 2 s after it started (``CLUSTER_WRITABLE_DELAY``).
A failover is the node timeout (1 s) plus the FAIL vote and the replica's election delay
(0.5-1 s plus a random 0-0.5 s). A frozen master is replaced as fast as a killed one; once
thawed it rejoins as a replica within 0.1 s on both.

A restarted node keeps its data directory and ``nodes.conf``, so a killed master comes back
as a replica of the node that replaced it; :meth:`LocalCluster.restart` waits for that
(Redis 7.0: 0.1-0.6 s; Valkey 9.1: about 1 s, its replica attaches on the next 1 s
replication tick). A master restarted before the node timeout is not replaced: it serves its
slots again, after its own 2 s writable delay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from redis.crc import key_slot

from streambus.testing.servers import (
    ServerProcess,
    TopologyError,
    free_port,
    server_binaries,
    stop_all,
    wait_until,
)

SLOTS = 16384
SlotRange = tuple[int, int]


@dataclass(frozen=True, slots=True)
class NodeEntry:
    """One line of ``CLUSTER NODES``: what the asked node believes about one node."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    connected: bool
    slots: tuple[SlotRange, ...]

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def usable(self) -> bool:
        """Known, connected and not suspected: the asked node has finished meeting it."""
        bad = {"handshake", "noaddr", "fail", "fail?"}
        return self.connected and not (self.flags & bad)


def parse_cluster_nodes(raw: bytes | str) -> list[NodeEntry]:
    """Parse a ``CLUSTER NODES`` reply (Redis 7.0 and Valkey 9.1 print the same fields)."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    entries = []
    for line in text.splitlines():
        node_id, addr, flags, master, _ping, _pong, _epoch, link, *slots = line.split()
        port = int(addr.split("@", 1)[0].rsplit(":", 1)[1] or 0)
        entries.append(NodeEntry(
            node_id=node_id, port=port, flags=frozenset(flags.split(",")),
            master_id=None if master == "-" else master, connected=link == "connected",
            # "[slot->-id]" / "[slot-<-id]" mark a migration in progress, not ownership.
            slots=tuple(_slot_range(s) for s in slots if not s.startswith("[")),
        ))
    return entries


def _slot_range(text: str) -> SlotRange:
    first, _, last = text.partition("-")
    return (int(first), int(last or first))


def slot_ranges(masters: int) -> list[SlotRange]:
    """The slots split evenly across ``masters``, as ``redis-cli --cluster create`` does."""
    bounds = [i * SLOTS // masters for i in range(masters + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(masters)]


class LocalCluster:
    """``masters`` masters with ``replicas`` replicas each, as real processes of ``binary``.

    ``stop()`` terminates only the processes this object started (by pid); use it as a
    context manager, or call ``start()`` / ``stop()``. Every wait polls for its condition
    with a deadline and raises :class:`~streambus.testing.servers.TopologyTimeout`.
    """

    def __init__(
        self,
        directory: Path,
        binary: Path | None = None,
        *,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 1000,
        appendonly: bool = False,
        password: str | None = None,
        config: Sequence[str] = (),
    ) -> None:
        binary = binary or server_binaries()["valkey"]
        self.masters_at_start = masters
        self.replicas_per_master = replicas
        self.password = password
        self._bus_ports: dict[int, int] = {}
        self.nodes: list[ServerProcess] = []
        for index in range(masters * (1 + replicas)):
            bus_port = free_port()
            node = ServerProcess(
                binary, directory / f"node-{index}", appendonly=appendonly,
                password=password, cluster=True,
                config=[
                    f"cluster-port {bus_port}",
                    f"cluster-node-timeout {node_timeout_ms}",
                    "repl-diskless-sync-delay 0",
                    # Redis 7.0 leaves a replica out of CLUSTER SLOTS (so clients never see
                    # it) while its replication offset is 0, i.e. until the master's first
                    # replication PING: 10 s by default, 1 s with this.
                    "repl-ping-replica-period 1",
                    *config,
                ],
            )
            self._bus_ports[node.port] = bus_port
            self.nodes.append(node)
        self._ids: dict[int, str] = {}
        self._last_slots: dict[int, tuple[SlotRange, ...]] = {}

    def __repr__(self) -> str:
        alive = sum(node.alive for node in self.nodes)
        return f"<LocalCluster {self.nodes[0].binary.name} {alive}/{len(self.nodes)} alive>"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    @property
    def seeds(self) -> list[tuple[str, int]]:
        """Every node's address: any live one is a valid startup node for a client."""
        return [node.address for node in self.nodes]

    @property
    def url(self) -> str:
        """``redis+cluster://[:password@]127.0.0.1:p1,127.0.0.1:p2,...``"""
        auth = f":{self.password}@" if self.password is not None else ""
        return "redis+cluster://" + auth + ",".join(f"{h}:{p}" for h, p in self.seeds)

    def start(self, timeout: float = 30.0) -> Self:
        """Start every node, wire the cluster, and wait until it is healthy."""
        try:
            for node in self.nodes:
                node.launch()
            for node in self.nodes:
                node.await_ready()
            self._introduce(timeout)
            self._assign_replicas(timeout)
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _introduce(self, timeout: float) -> None:
        for epoch, node in enumerate(self.nodes, start=1):
            with node.client() as client:
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
                self._ids[node.port] = client.execute_command("CLUSTER", "MYID").decode()
        with self.nodes[0].client() as client:
            for node in self.nodes[1:]:
                client.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port,
                                       self._bus_ports[node.port])
        for node, (first, last) in zip(self.nodes, slot_ranges(self.masters_at_start),
                                       strict=False):
            with node.client() as client:
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        wait_until(self._everyone_met, timeout, "every node to know every other node")

    def _everyone_met(self) -> bool:
        for node in self.nodes:
            entries = self.view(node)
            if len(entries) != len(self.nodes) or not all(e.usable for e in entries):
                return False
        return True

    def _assign_replicas(self, timeout: float) -> None:
        replicas = self.nodes[self.masters_at_start:]
        for index, replica in enumerate(replicas):
            master = self.nodes[index // self.replicas_per_master]

            def replicate(replica: ServerProcess = replica,
                          master: ServerProcess = master) -> bool:
                with replica.client() as client:
                    client.execute_command("CLUSTER", "REPLICATE", self._ids[master.port])
                return True

            wait_until(replicate, timeout, f"{replica!r} to accept CLUSTER REPLICATE")

    def stop(self) -> None:
        """Terminate every node this cluster started (frozen ones are thawed first)."""
        stop_all(self.nodes)

    # -- who is who -------------------------------------------------------------------------

    def node_id(self, node: ServerProcess) -> str:
        return self._ids[node.port]

    def view(self, node: ServerProcess) -> list[NodeEntry]:
        """``CLUSTER NODES`` as ``node`` sees it."""
        with node.client() as client:
            return parse_cluster_nodes(client.execute_command("CLUSTER", "NODES"))

    def _by_id(self, node_id: str) -> ServerProcess:
        for node in self.nodes:
            if self._ids.get(node.port) == node_id:
                return node
        raise TopologyError(f"node id {node_id} is not one of this cluster's nodes")

    def _a_live_view(self) -> list[NodeEntry]:
        for node in self.nodes:
            if node.alive:
                return self.view(node)
        raise TopologyError("no node of the cluster is alive")

    def node_for_slot(self, slot: int) -> ServerProcess:
        """The master serving ``slot``, as a live node currently sees it."""
        for entry in self._a_live_view():
            if entry.is_master and any(a <= slot <= b for a, b in entry.slots):
                return self._by_id(entry.node_id)
        raise TopologyError(f"no master serves slot {slot}")

    def master_of(self, key: str | bytes) -> ServerProcess:
        """The master serving ``key`` (hash tags count, as in the client)."""
        return self.node_for_slot(key_slot(key.encode() if isinstance(key, str) else key))

    def masters(self) -> list[ServerProcess]:
        """The masters that serve slots, as a live node sees it."""
        return [self._by_id(e.node_id) for e in self._a_live_view()
                if e.is_master and e.slots]

    def replicas_of(self, master: ServerProcess) -> list[ServerProcess]:
        master_id = self._ids[master.port]
        return [self._by_id(e.node_id) for e in self._a_live_view()
                if e.master_id == master_id]

    # -- faults -----------------------------------------------------------------------------

    def kill_master_of(self, key: str | bytes) -> ServerProcess:
        """SIGKILL the master serving ``key``; return it (for ``wait_failover``/``restart``)."""
        master = self.master_of(key)
        self.kill(master)
        return master

    def kill(self, node: ServerProcess) -> None:
        self._remember_slots(node)
        node.kill()

    def freeze(self, node: ServerProcess) -> None:
        """SIGSTOP ``node``: a master frozen past the node timeout is failed over."""
        self._remember_slots(node)
        node.freeze()

    def thaw(self, node: ServerProcess) -> None:
        """SIGCONT ``node``; a master replaced meanwhile rejoins as a replica (see wait_healthy)."""
        node.thaw()

    def restart(self, node: ServerProcess, timeout: float = 30.0) -> None:
        """Kill ``node`` if it runs, start it again, and wait until the cluster is healthy."""
        node.kill()
        node.start()
        self.wait_healthy(timeout)

    def _remember_slots(self, node: ServerProcess) -> None:
        node_id = self._ids[node.port]
        # A node that is already down or frozen cannot be asked; a live peer still knows.
        for entry in self.view(node) if node.alive else self._a_live_view():
            if entry.node_id == node_id:
                self._last_slots[node.port] = entry.slots

    # -- waits ------------------------------------------------------------------------------

    def wait_failover(self, old: ServerProcess, timeout: float = 30.0) -> ServerProcess:
        """Wait until another node serves ``old``'s slots and every live node says
        ``cluster_state:ok`` and agrees on who serves every slot; return the new master."""
        slots = self._last_slots.get(old.port)
        if not slots:
            raise TopologyError(f"{old!r} served no slots when it was killed or frozen")
        old_id = self._ids[old.port]
        promoted: list[ServerProcess] = []

        def replaced() -> bool:
            owners = self._agreed_owners()
            if owners is None or owners[slots[0][0]] == old_id:
                return False
            promoted[:] = [self._by_id(owners[slots[0][0]])]
            return True

        wait_until(replaced, timeout, f"a replica to take over from {old!r}")
        return promoted[0]

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until every live node says ``cluster_state:ok``, all agree on who serves every
        slot, and every live replica's link to its master is up."""
        wait_until(lambda: self._agreed_owners() is not None and self._replicas_linked(),
                   timeout, "the cluster to be healthy")

    def _agreed_owners(self) -> list[str] | None:
        """Slot -> serving node id, when every live node is ok and agrees; else None."""
        agreed: list[str] | None = None
        for node in self.nodes:
            if not node.alive:
                continue
            with node.client() as client:
                if b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                    return None
            owners = self._owners(self.view(node))
            if owners is None or (agreed is not None and owners != agreed):
                return None
            agreed = owners
        if agreed is None:
            return None
        # Believed is not enough: each serving node must be alive and a master by its own word.
        for node_id in set(agreed):
            server = self._by_id(node_id)
            if not server.alive:
                return None
            with server.client() as client:
                if client.info("replication")["role"] != "master":
                    return None
        return agreed

    @staticmethod
    def _owners(entries: list[NodeEntry]) -> list[str] | None:
        owners = [""] * SLOTS
        for entry in entries:
            if not entry.is_master or "fail" in entry.flags:
                continue
            for first, last in entry.slots:
                owners[first:last + 1] = [entry.node_id] * (last - first + 1)
        return None if "" in owners else owners

    def _replicas_linked(self) -> bool:
        """Every live replica is synced, and every live node lists it in ``CLUSTER SLOTS``."""
        replicas: set[int] = set()
        for node in self.nodes:
            if not node.alive:
                continue
            with node.client() as client:
                info = client.info("replication")
            if info["role"] != "master":
                if info.get("master_link_status") != "up":
                    return False
                replicas.add(node.port)
        for node in self.nodes:
            if node.alive and self._listed_replicas(node) != replicas:
                return False
        return True

    @staticmethod
    def _listed_replicas(node: ServerProcess) -> set[int]:
        """Ports ``CLUSTER SLOTS`` on ``node`` lists as replicas: what a client learns."""
        with node.client() as client:
            ranges = client.execute_command("CLUSTER", "SLOTS")
        return {int(replica[1]) for _first, _last, _master, *listed in ranges
                for replica in listed}
