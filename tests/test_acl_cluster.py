"""The ACL roles of ``streambus acl ROLE`` on a Redis Cluster (3 masters, 3 replicas; Valkey
and Redis 7.0): the same users as ``tests/test_acl_roles.py``, created with ``ACL SETUSER`` on
every node (ACLs are per node in a cluster, replicas included), do their jobs through a
``redis+cluster://user:pw@...`` URL, and are refused everything else: exit 77 and one line
from the CLI, ``NoPermissionError`` from redis-py's own cluster client or a client of one node.

The jobs also leave no refusal in any node's ``ACL LOG``: a command a client sends and then
tolerates being refused (a cluster client's discovery, say) would otherwise go unnoticed.
A promoted replica serves every role, which is why the users go on the replicas too. The
last test does the same on Sentinel's data nodes, the other topology.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis
import redis.cluster
from redis.cluster import LoadBalancingStrategy

import streambus
from streambus.errors import NotPermitted
from streambus.testing import LocalCluster, LocalSentinelSet, ServerProcess, server_binaries
from tests.clitools import Cli, finish, one_json_object
from tests.test_acl_roles import (
    ADMIN_PASSWORD,
    NS,
    SWARM,
    USERS,
    agent_job,
    projector_job,
    refused,
    waiters_join_a_blocked_read,
)

SERVER_KINDS = server_binaries()
FORBIDDEN: tuple[tuple[str, ...], ...] = (("FLUSHALL",), ("CONFIG", "GET", "*"), ("KEYS", "*"))


def create_users(node: ServerProcess, rules: dict[str, str]) -> None:
    """``ACL SETUSER`` every user on ``node``: ACLs are per node, and in memory only."""
    with node.client() as root:
        for user, line in rules.items():
            root.execute_command("ACL", "SETUSER", user, "on", f">{user}-pw", *line.split())


def refusals(nodes: list[ServerProcess]) -> list[str]:
    """The ``ACL LOG`` of every live node of ``nodes``, one line per entry."""
    lines = []
    for node in nodes:
        if node.alive:
            with node.client() as root:
                lines += [f"{node.port}: {e['username']} {e['reason']} {e['object']} "
                          f"({e['context']})" for e in root.acl_log()]
    return lines


def forget_refusals(nodes: list[ServerProcess]) -> None:
    for node in nodes:
        if node.alive:
            with node.client() as root:
                root.acl_log_reset()


def bus_args(url: str) -> list[str]:
    return ["--redis-url", url, "--namespace", NS]


@dataclass
class SecuredCluster:
    cluster: LocalCluster
    rules: dict[str, str]
    """user -> the rules ``streambus acl`` printed for it"""

    def url(self, user: str) -> str:
        seeds = ",".join(f"{host}:{port}" for host, port in self.cluster.seeds)
        return f"redis+cluster://{user}:{user}-pw@{seeds}"

    def args(self, user: str) -> list[str]:
        return bus_args(self.url(user))

    def master_of_swarm(self, swarm: str) -> ServerProcess:
        return self.cluster.master_of(f"{NS}:{{{swarm}}}:events")

    def swarm_elsewhere(self, prefix: str) -> str:
        """A swarm named ``prefix...`` whose keys live on another master than ``SWARM``'s."""
        home = self.master_of_swarm(SWARM)
        return next(name for name in (f"{prefix}{n}" for n in range(100))
                    if self.master_of_swarm(name) != home)

    def refusals(self) -> list[str]:
        return refusals(self.cluster.nodes)

    def forget_refusals(self) -> None:
        forget_refusals(self.cluster.nodes)


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """user -> its rules, from the real ``streambus acl ROLE --namespace NS [--swarm S]``."""
    cli = Cli(tmp_path_factory.mktemp("home"))
    try:
        printed = {}
        for user, (role, swarm) in USERS.items():
            result = cli.run("acl", role, "--namespace", NS,
                             *(["--swarm", swarm] if swarm else []))
            assert result.returncode == 0, result.stderr
            printed[user] = result.stdout.strip()
            assert "\n" not in printed[user]
        yield printed
    finally:
        cli.close()


@pytest.fixture(scope="module", params=sorted(SERVER_KINDS))
def secured(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            rules: dict[str, str]) -> Iterator[SecuredCluster]:
    """A cluster with an admin password and every user on every node, replicas included."""
    kind: str = request.param
    with LocalCluster(tmp_path_factory.mktemp(f"acl-cluster-{kind}"), SERVER_KINDS[kind],
                      password=ADMIN_PASSWORD) as cluster:
        for node in cluster.nodes:
            create_users(node, rules)
        yield SecuredCluster(cluster, rules)


@pytest.fixture
def quiet(secured: SecuredCluster) -> SecuredCluster:
    """The cluster, its ACL logs emptied; a test asserts ``refusals() == []`` where it means
    that nothing was refused, even silently."""
    secured.forget_refusals()
    return secured


# -- agent ----------------------------------------------------------------------------------------

def test_agent_signals_waits_acknowledges_heartbeats_and_retries(cli: Cli, quiet: SecuredCluster
                                                                 ) -> None:
    agent_job(cli, quiet.args("agent"))
    assert quiet.refusals() == []


@pytest.mark.anyio
async def test_agent_waits_of_one_process_share_the_dispatcher(quiet: SecuredCluster) -> None:
    """A second waiter arrives while the dispatcher's read blocks on the swarm's master (the
    first waiter's own XREADGROUP): the dispatcher must interrupt it with CLIENT UNBLOCK
    (``block_ms`` is far beyond the test's bound), then serves both with one XREAD and its
    scripted group reads."""
    await waiters_join_a_blocked_read(quiet.url("agent"), quiet.master_of_swarm(SWARM))
    assert quiet.refusals() == []


def test_agent_of_one_swarm_cannot_touch_another_on_any_master(cli: Cli, secured: SecuredCluster
                                                               ) -> None:
    other = secured.swarm_elsewhere("other")
    line = refused(cli.run("signal", other, "go", "--signal-id", "x1", *secured.args("agent")))
    assert f"{NS}:{{{other}}}:ch:go" in line
    line = refused(cli.run("wait", SWARM, "c1", "go", "--timeout", "1s", "--redis-url",
                           secured.url("agent"), "--namespace", "elsewhere"))
    assert f"script 'begin_wait' on elsewhere:{{{SWARM}}}:" in line


# -- observer -------------------------------------------------------------------------------------

def test_observer_runs_status_of_swarms_on_every_master(cli: Cli, quiet: SecuredCluster) -> None:
    far = quiet.swarm_elsewhere("far")
    for swarm in (SWARM, far):
        beat = cli.run("wait", swarm, "seen", "nothing", "--timeout", "50ms",
                       *quiet.args("agent-ns"))
        assert beat.returncode == 2, beat.stderr
    one = cli.run("status", SWARM, "--json", *quiet.args("observer"))
    assert one.returncode == 0, one.stderr
    rows = one_json_object(one.stdout)["coordinators"]
    assert {"coordinator": "seen", "state": "timed_out"}.items() <= next(
        r for r in rows if r["coordinator"] == "seen").items()
    every = cli.run("status", "--json", *quiet.args("observer-ns"))  # SCAN on each master
    assert every.returncode == 0, every.stderr
    assert {SWARM, far} <= {s["swarm"] for s in one_json_object(every.stdout)["swarms"]}
    table = cli.run("status", SWARM, *quiet.args("observer"))
    assert table.returncode == 0, table.stderr
    assert quiet.refusals() == []


@pytest.mark.parametrize(("command", "script"), [
    (["signal", SWARM, "go"], "publish"),
    (["wait", SWARM, "c9", "go", "--timeout", "1s"], "begin_wait"),
], ids=["signal", "wait"])
def test_observer_writes_nothing(cli: Cli, secured: SecuredCluster, command: list[str],
                                 script: str) -> None:
    line = refused(cli.run(*command, *secured.args("observer-ns")))
    assert f"script '{script}' on {NS}:{{{SWARM}}}:" in line


# -- projector ------------------------------------------------------------------------------------

@pytest.mark.anyio
async def test_projector_keeps_its_groups_and_reports_dead(quiet: SecuredCluster) -> None:
    async with streambus.connect(quiet.url("projector"), namespace=NS) as bus:
        await projector_job(quiet.url("agent"), bus)
        lease = bus.lease(SWARM, "traces", ttl=5)
        await lease.acquire()
        assert lease.held
        await lease.release()
        assert quiet.refusals() == []
        with pytest.raises(NotPermitted, match="script 'publish'"):
            await bus.publish(SWARM, "proj", None)  # a projector cannot forge a signal


# -- admin ----------------------------------------------------------------------------------------

def test_admin_cleans_up_on_every_master(cli: Cli, quiet: SecuredCluster) -> None:
    stale = ["stale", quiet.swarm_elsewhere("stale")]
    for swarm in stale:
        assert cli.run("wait", swarm, "old", "ch", "--timeout", "1ms",
                       *quiet.args("agent-ns")).returncode == 2
    result = cli.run("cleanup", "--stale-after", "1ms", "--json", "--log-file", "/dev/null",
                     *quiet.args("admin"))
    assert result.returncode == 0, result.stderr
    removed = {s["swarm"]: s["removed"] for s in one_json_object(result.stdout)["swarms"]}
    assert {swarm: ["old"] for swarm in stale}.items() <= removed.items(), removed
    assert quiet.refusals() == []


# -- every role, every node -----------------------------------------------------------------------

@pytest.mark.parametrize("user", sorted(USERS))
def test_no_role_runs_dangerous_commands_through_a_cluster_client(secured: SecuredCluster,
                                                                  user: str) -> None:
    """redis-py's cluster client starts (its discovery, CLUSTER SLOTS and COMMAND, is within
    the rules), reads a key of the role's scope from a replica (READONLY first), and is
    refused FLUSHALL, CONFIG and KEYS."""
    host, port = secured.cluster.seeds[0]
    with redis.cluster.RedisCluster(host=host, port=port, username=user,
                                    password=f"{user}-pw", socket_timeout=2,
                                    load_balancing_strategy=LoadBalancingStrategy.RANDOM_REPLICA
                                    ) as client:
        assert isinstance(client.hgetall(f"{NS}:{{{SWARM}}}:counters"), dict)
        for command in FORBIDDEN:
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.execute_command(*command)
    assert all(node.alive for node in secured.cluster.nodes)


def test_no_role_runs_dangerous_commands_on_any_node(secured: SecuredCluster) -> None:
    """Replicas included: each node knows every user (a user set on the masters alone could
    not log in to a replica, which a failover makes a master) and refuses it the same."""
    replicas = [r for m in secured.cluster.masters() for r in secured.cluster.replicas_of(m)]
    assert len(replicas) == 3
    for node in secured.cluster.nodes:
        for user in USERS:
            with redis.Redis(port=node.port, username=user, password=f"{user}-pw",
                             socket_timeout=2) as client:
                assert client.ping()
                for command in FORBIDDEN:
                    with pytest.raises(redis.exceptions.NoPermissionError):
                        client.execute_command(*command)


# -- failover (last: it restarts a node) -----------------------------------------------------------

def test_a_promoted_replica_serves_every_role(cli: Cli, secured: SecuredCluster) -> None:
    """The users set on the replicas are what lets the roles go on after a failover."""
    swarm = "promoted"
    old = secured.cluster.kill_master_of(f"{NS}:{{{swarm}}}:events")
    try:
        secured.cluster.wait_failover(old)
        secured.forget_refusals()
        waiter = cli.start("wait", swarm, "c1", "go", "--timeout", "20s",
                           *secured.args("agent-ns"))
        sent = cli.run("signal", swarm, "go", "--signal-id", "after", "--await-ack", "c1",
                       "--ack-timeout", "15s", *secured.args("agent-ns"))
        assert sent.returncode == 0, sent.stderr
        code, _out, err = finish(waiter)
        assert code == 0, err
        seen = cli.run("status", swarm, "--json", *secured.args("observer-ns"))
        assert seen.returncode == 0, seen.stderr
        assert "c1" in {r["coordinator"] for r in one_json_object(seen.stdout)["coordinators"]}
        assert secured.refusals() == []
    finally:
        secured.cluster.restart(old)  # back as a replica, and without users: they were in
        create_users(old, secured.rules)  # memory only (ACL SAVE keeps them, with an aclfile)


# -- Sentinel ------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=sorted(SERVER_KINDS))
def sentinel_set(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                 rules: dict[str, str]) -> Iterator[LocalSentinelSet]:
    """A master, a replica and 3 sentinels; every user on both data nodes (the sentinels keep
    no data and let the bus ask them unauthenticated)."""
    kind: str = request.param
    with LocalSentinelSet(tmp_path_factory.mktemp(f"acl-sentinel-{kind}"), SERVER_KINDS[kind],
                          password=ADMIN_PASSWORD) as sentinels:
        for node in sentinels.servers:
            create_users(node, rules)
        yield sentinels


def test_roles_hold_on_sentinel_and_after_its_failover(cli: Cli, sentinel_set: LocalSentinelSet,
                                                      rules: dict[str, str]) -> None:
    """The same users on the master and the replica: an agent signals and waits, an observer
    reads and may not signal, and both go on once the replica has been promoted."""
    hosts = ",".join(f"{host}:{port}" for host, port in sentinel_set.seeds)

    def args(user: str) -> list[str]:
        return bus_args(f"redis+sentinel://{user}:{user}-pw@{hosts}/{sentinel_set.service}")

    forget_refusals(sentinel_set.servers)
    waiter = cli.start("wait", SWARM, "c1", "go", "--timeout", "20s", *args("agent"))
    sent = cli.run("signal", SWARM, "go", "--await-ack", "c1", "--ack-timeout", "15s",
                   *args("agent"))
    assert sent.returncode == 0, sent.stderr
    code, _out, err = finish(waiter)
    assert code == 0, err
    line = refused(cli.run("signal", SWARM, "go", *args("observer")))
    assert f"script 'publish' on {NS}:{{{SWARM}}}:" in line
    forget_refusals(sentinel_set.servers)
    old = sentinel_set.kill_master()
    try:
        sentinel_set.wait_failover(old)
        # Written after the failover: what the old master held may not have reached the replica.
        again = cli.run("wait", SWARM, "c2", "nothing", "--timeout", "50ms", *args("agent"))
        assert again.returncode == 2, again.stderr
        seen = cli.run("status", SWARM, "--json", *args("observer"))
        assert seen.returncode == 0, seen.stderr
        assert "c2" in {r["coordinator"] for r in one_json_object(seen.stdout)["coordinators"]}
        assert refusals(sentinel_set.servers) == []
    finally:
        sentinel_set.restart(old)
        create_users(old, rules)
