"""A throwaway Sentinel setup of real processes: a master, a replica and three sentinels.

The sentinels run the same binary as the data nodes (``valkey-server sentinel.conf
--sentinel``). Sentinel rewrites its config file as it learns the other sentinels, the
replicas and each new master, so the file lives in the sentinel's own directory and is
written only on the first start: a restarted sentinel resumes from what it had learnt.
Quorum 2 of 3, ``down-after-milliseconds`` 1000, ``failover-timeout`` 5000.

A failover needs every sentinel to know the others and the replica. They would find each
other through hello messages published on the master every 2 s, and the replica in the
master's INFO (asked on connect, then every 10 s); so the replicas are attached before the
sentinels start, and each sentinel's first config names the others (``sentinel myid`` /
``known-sentinel``) and the replicas (``known-replica``), as its own rewritten file would.

Measured on this project's shared 2-core machine (load average 4-8 from other work), five
runs each, median (min-max):

================  =====================  ===============================================
binary            ``start()``            ``kill_master`` until ``wait_failover`` returns
================  =====================  ===============================================
Valkey 9.1.2      1.2 s (0.2-2.3)        2.3 s (2.3-2.3)
Redis 7.0.15      1.3 s (0.1-1.4)        2.4 s (2.3-3.2)
================  =====================  ===============================================

Start-up jumps in steps of 1 s: a sentinel whose first connection to a peer fails (the peer
was still starting) retries once a second. A failover is down-after-milliseconds (1 s), the
vote, a random delay of up to 1 s, and the promotion. A frozen master is replaced in about
3.2 s on both. :meth:`LocalSentinelSet.restart` of a replaced master takes about 1.1 s (the
sentinels reconnect to it once a second); of a sentinel, 0.1 s on Redis 7.0 and 1.1 s on
Valkey 9.1.

A replaced master that comes back on its own (``thaw`` after a freeze) still says it is a
master until the sentinels convert it, which they do only after it has looked like a
master for 8 s (``SENTINEL_PUBLISH_PERIOD * 4`` in the sentinel source): ``thaw`` then
``wait_healthy`` took 10-11 s on both binaries, a real split-brain window.
:meth:`LocalSentinelSet.restart` instead starts a data node as a replica of the current
master, as an orchestrator that rewrites the node's config would.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from streambus.testing.servers import (
    ServerProcess,
    TopologyError,
    server_binaries,
    stop_all,
    wait_until,
)

_SENTINEL_TROUBLE = {"s_down", "o_down", "disconnected", "failover_in_progress",
                     "promoted", "reconf_sent", "reconf_inprog"}


@dataclass(repr=False)
class SentinelProcess(ServerProcess):
    """A ``--sentinel`` process monitoring one master under ``service``."""

    service: str = "mymaster"
    monitored: tuple[str, int] = ("127.0.0.1", 6379)
    quorum: int = 2
    down_after_ms: int = 1000
    failover_timeout_ms: int = 5000
    auth_pass: str | None = None
    sentinel_id: str = field(default_factory=lambda: secrets.token_hex(20))
    known_sentinels: Sequence[SentinelProcess] = ()
    known_replicas: Sequence[tuple[str, int]] = ()

    def config_lines(self) -> list[str]:
        host, port = self.monitored
        name = self.service
        lines = [
            f"port {self.port}", "bind 127.0.0.1", f'dir "{self.directory}"',
            f"sentinel myid {self.sentinel_id}",
            f"sentinel monitor {name} {host} {port} {self.quorum}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
        ]
        if self.auth_pass is not None:
            lines.append(f"sentinel auth-pass {name} {self.auth_pass}")
        lines += [f"sentinel known-sentinel {name} 127.0.0.1 {other.port} {other.sentinel_id}"
                  for other in self.known_sentinels if other is not self]
        lines += [f"sentinel known-replica {name} {h} {p}" for h, p in self.known_replicas]
        return [*lines, *self.config]

    def _write_config(self) -> Path:
        # Sentinel rewrites this file with all it learns; a restart must not reset that.
        conf = self.directory / "sentinel.conf"
        if not conf.exists():
            conf.write_text("".join(f"{line}\n" for line in self.config_lines()))
        return conf

    def _mode_args(self) -> list[str]:
        return ["--sentinel"]

    def ask(self, *command: str) -> Any:
        """Send one ``SENTINEL ...`` command to this sentinel and return the raw reply."""
        with self.client() as client:
            return client.execute_command("SENTINEL", *command)


class LocalSentinelSet:
    """One master, ``replicas`` replicas and ``sentinels`` sentinels of ``binary``.

    ``stop()`` terminates only the processes this object started (by pid). Every wait polls
    for its condition with a deadline and raises
    :class:`~streambus.testing.servers.TopologyTimeout`.
    """

    def __init__(
        self,
        directory: Path,
        binary: Path | None = None,
        *,
        service: str = "mymaster",
        replicas: int = 1,
        sentinels: int = 3,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
        password: str | None = None,
        appendonly: bool = False,
        config: Sequence[str] = (),
    ) -> None:
        binary = binary or server_binaries()["valkey"]
        self.service = service
        self.password = password
        first = ServerProcess(binary, directory / "data-0", appendonly=appendonly,
                              password=password, config=["repl-diskless-sync-delay 0",
                                                         *config])
        self.servers: list[ServerProcess] = [first] + [
            ServerProcess(binary, directory / f"data-{i}", appendonly=appendonly,
                          password=password, replicaof=first.address,
                          config=["repl-diskless-sync-delay 0", *config])
            for i in range(1, 1 + replicas)
        ]
        self.sentinels: list[SentinelProcess] = [
            SentinelProcess(binary, directory / f"sentinel-{i}", service=service,
                            monitored=first.address, quorum=quorum,
                            down_after_ms=down_after_ms,
                            failover_timeout_ms=failover_timeout_ms, auth_pass=password)
            for i in range(sentinels)
        ]
        # Sentinels find each other through hello messages published on the master every
        # 2 s, and would find the replicas in the master's INFO. Writing into their config
        # what a restarted sentinel's rewritten file holds anyway (each other's ids, the
        # replicas) lets the set fail over as soon as it is up, 2 s earlier.
        for sentinel in self.sentinels:
            sentinel.known_sentinels = self.sentinels
            sentinel.known_replicas = [node.address for node in self.servers[1:]]

    def __repr__(self) -> str:
        alive = sum(node.alive for node in self.servers)
        watching = sum(node.alive for node in self.sentinels)
        return (f"<LocalSentinelSet {self.service!r} {alive}/{len(self.servers)} servers, "
                f"{watching}/{len(self.sentinels)} sentinels alive>")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    @property
    def seeds(self) -> list[tuple[str, int]]:
        """The sentinels' addresses (what a Sentinel client is given)."""
        return [sentinel.address for sentinel in self.sentinels]

    @property
    def url(self) -> str:
        """``redis+sentinel://[:password@]127.0.0.1:s1,127.0.0.1:s2,127.0.0.1:s3/mymaster``"""
        auth = f":{self.password}@" if self.password is not None else ""
        hosts = ",".join(f"{host}:{port}" for host, port in self.seeds)
        return f"redis+sentinel://{auth}{hosts}/{self.service}"

    def start(self, timeout: float = 30.0) -> Self:
        """Start the data nodes, then the sentinels; wait until a failover could happen."""
        try:
            for node in self.servers:
                node.launch()
            for node in self.servers:
                node.await_ready()
            # A sentinel learns the replicas from the master's INFO, asked once on connect and
            # then every 10 s: a replica not yet attached at that first INFO stays unknown
            # (and the set unable to fail over) for 10 s. So attach the replicas first.
            wait_until(self._replicas_linked_to_first, timeout, "the replicas to sync")
            for sentinel in self.sentinels:
                sentinel.launch()
            for sentinel in self.sentinels:
                sentinel.await_ready()
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _replicas_linked_to_first(self) -> bool:
        with self.servers[0].client() as client:
            listed = client.info("replication")["connected_slaves"]
        return bool(listed == len(self.servers) - 1)

    def stop(self) -> None:
        """Terminate every process this set started: sentinels first, so none fails over."""
        stop_all(self.sentinels)
        stop_all(self.servers)

    # -- who is who -------------------------------------------------------------------------

    def _by_port(self, port: int) -> ServerProcess:
        for node in self.servers:
            if node.port == port:
                return node
        raise TopologyError(f"port {port} is not one of this set's data nodes")

    def _reported_master(self, sentinel: SentinelProcess) -> ServerProcess:
        _host, port = sentinel.ask("GET-MASTER-ADDR-BY-NAME", self.service)
        return self._by_port(int(port))

    def master(self) -> ServerProcess:
        """The current master, as the first live sentinel reports it."""
        for sentinel in self.sentinels:
            if sentinel.alive:
                return self._reported_master(sentinel)
        raise TopologyError("no sentinel is alive")

    def replicas(self) -> list[ServerProcess]:
        """The data nodes that are not the current master."""
        master = self.master()
        return [node for node in self.servers if node is not master]

    # -- faults -----------------------------------------------------------------------------

    def kill_master(self) -> ServerProcess:
        """SIGKILL the current master; return it (for ``wait_failover``/``restart``)."""
        master = self.master()
        master.kill()
        return master

    def freeze(self, node: ServerProcess) -> None:
        node.freeze()

    def thaw(self, node: ServerProcess) -> None:
        node.thaw()

    def restart(self, node: ServerProcess, timeout: float = 30.0) -> None:
        """Kill ``node`` if it runs and start it again; wait until the set is healthy.

        A data node that is not the current master comes back as its replica.
        """
        node.kill()
        if not isinstance(node, SentinelProcess):
            master = self.master()
            node.replicaof = None if master is node else master.address
        node.start()
        self.wait_healthy(timeout)

    # -- waits ------------------------------------------------------------------------------

    def wait_failover(self, old: ServerProcess, timeout: float = 30.0) -> ServerProcess:
        """Wait until every live sentinel names the same new master and it says it is one."""
        promoted: list[ServerProcess] = []

        def replaced() -> bool:
            master = self._agreed_master()
            if master is None or master is old:
                return False
            promoted[:] = [master]
            return True

        wait_until(replaced, timeout, f"the sentinels to replace {old!r}")
        return promoted[0]

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until the sentinels agree on a live master, know each other and every live
        replica, and every live replica's link to the master is up."""
        wait_until(self._healthy, timeout, "the sentinel set to be healthy")

    def _agreed_master(self) -> ServerProcess | None:
        reported = {self._reported_master(s).port for s in self.sentinels if s.alive}
        if len(reported) != 1:
            return None
        master = self._by_port(reported.pop())
        if not master.alive:
            return None
        with master.client() as client:
            return master if client.info("replication")["role"] == "master" else None

    def _healthy(self) -> bool:
        master = self._agreed_master()
        if master is None:
            return False
        replicas = [node for node in self.servers if node.alive and node is not master]
        for node in replicas:
            with node.client() as client:
                info = client.info("replication")
            if info.get("master_link_status") != "up" or info["master_port"] != master.port:
                return False
        return all(self._sentinel_ready(s, replicas) for s in self.sentinels if s.alive)

    def _sentinel_ready(self, sentinel: SentinelProcess,
                        replicas: list[ServerProcess]) -> bool:
        state = _pairs(sentinel.ask("MASTER", self.service))
        if set(state["flags"].split(",")) & _SENTINEL_TROUBLE:
            return False
        if int(state["num-other-sentinels"]) < len(self.sentinels) - 1:
            return False
        others = [_pairs(reply) for reply in sentinel.ask("SENTINELS", self.service)]
        live = {other.port for other in self.sentinels if other.alive and other is not sentinel}
        linked = {int(other["port"]) for other in others
                  if not set(other["flags"].split(",")) & _SENTINEL_TROUBLE}
        if not live <= linked:
            return False
        listed = [_pairs(reply) for reply in sentinel.ask("REPLICAS", self.service)]
        known = {int(replica["port"]): replica["flags"] for replica in listed}
        return all(node.port in known
                   and not set(known[node.port].split(",")) & _SENTINEL_TROUBLE
                   for node in replicas)


def _pairs(reply: Sequence[bytes] | dict[bytes, bytes]) -> dict[str, str]:
    """A Sentinel reply about one instance as a dict of str: a RESP3 map (redis-py's default
    protocol since 8.0) or a RESP2 flat ``[field, value, ...]`` list."""
    if isinstance(reply, dict):
        return {key.decode(): value.decode() for key, value in reply.items()}
    items = [item.decode() for item in reply]
    return dict(zip(items[::2], items[1::2], strict=True))
