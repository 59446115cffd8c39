"""The local topologies of :mod:`streambus.testing` are what they claim, on every binary.

Checked from outside with redis-py's own sync clients (``RedisCluster``, ``Sentinel``), not
with the topology objects' views of themselves. The topologies are module-scoped: the
failover tests restart what they killed, so the module leaves each one healthy.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

from streambus.testing import LocalCluster, LocalSentinelSet, ServerProcess
from streambus.testing.servers import TopologyError
from tests.tls import make_tls_files, make_untrusted_ca, tls_server

KEY = "topology:{probe}"


@contextmanager
def cluster_client(cluster: LocalCluster) -> Iterator[RedisCluster]:
    nodes = [ClusterNode(host, port) for host, port in cluster.seeds]
    with RedisCluster(startup_nodes=nodes, decode_responses=True, socket_timeout=2) as client:
        yield client


@contextmanager
def sentinel_client(sentinel_set: LocalSentinelSet) -> Iterator[Sentinel]:
    sentinel = Sentinel(sentinel_set.seeds, socket_timeout=2, decode_responses=True,
                        sentinel_kwargs={"socket_timeout": 2, "decode_responses": True})
    try:
        yield sentinel
    finally:
        for connection in sentinel.sentinels:
            connection.close()


def test_cluster_has_three_masters_each_with_a_replica_and_every_slot(
        local_cluster: LocalCluster) -> None:
    with cluster_client(local_cluster) as client:
        assert len(client.get_primaries()) == 3
        assert len(client.get_replicas()) == 3
        slots = client.nodes_manager.slots_cache
        assert sorted(slots) == list(range(16384))
        assert all(len(serving) == 2 for serving in slots.values())  # a primary and a replica
        client.set(KEY, "here")
        assert client.get(KEY) == "here"
    assert local_cluster.url.startswith("redis+cluster://127.0.0.1:")
    assert local_cluster.url.count(",") == 5


def test_killing_the_master_of_a_key_promotes_its_replica(local_cluster: LocalCluster) -> None:
    old = local_cluster.master_of(KEY)
    (replica,) = local_cluster.replicas_of(old)
    with old.client() as direct:
        direct.set(KEY, "before")
        assert direct.wait(1, 2000) == 1  # the replica has it: failover must not lose it

    assert local_cluster.kill_master_of(KEY) is old
    new = local_cluster.wait_failover(old)

    assert new is replica
    with cluster_client(local_cluster) as client:
        assert client.get_node_from_key(KEY).port == new.port
        assert client.get(KEY) == "before"
        client.set(KEY, "after")
    local_cluster.restart(old)  # comes back as the new master's replica
    assert local_cluster.replicas_of(new) == [old]


def test_sentinel_set_comes_up_with_sentinels_that_know_each_other(
        local_sentinel_set: LocalSentinelSet) -> None:
    master = local_sentinel_set.master()
    (replica,) = local_sentinel_set.replicas()
    with sentinel_client(local_sentinel_set) as sentinel:
        assert sentinel.discover_master("mymaster") == master.address
        assert sentinel.discover_slaves("mymaster") == [replica.address]
        for each in sentinel.sentinels:
            state = each.sentinel_master("mymaster")
            assert state["num-other-sentinels"] == 2
            assert state["quorum"] == 2
        with sentinel.master_for("mymaster") as client:
            assert client.set(KEY, "here")
    assert local_sentinel_set.url.endswith("/mymaster")


def test_killing_the_master_promotes_the_replica_and_sentinels_agree(
        local_sentinel_set: LocalSentinelSet) -> None:
    (replica,) = local_sentinel_set.replicas()
    with local_sentinel_set.master().client() as direct:
        direct.set(KEY, "before")
        assert direct.wait(1, 2000) == 1

    old = local_sentinel_set.kill_master()
    new = local_sentinel_set.wait_failover(old)

    assert new is replica
    with sentinel_client(local_sentinel_set) as sentinel:
        for each in sentinel.sentinels:
            assert each.sentinel_get_master_addr_by_name("mymaster") == new.address
        with sentinel.master_for("mymaster") as client:
            assert client.get(KEY) == "before"
            assert client.set(KEY, "after")
    local_sentinel_set.restart(old)  # comes back as the new master's replica
    # On a loaded machine the sentinels may fail over once more (a 1 s down-after), onto the
    # node that just came back: either way one is master and the other its replica.
    nodes = [local_sentinel_set.master(), *local_sentinel_set.replicas()]
    assert sorted(n.port for n in nodes) == sorted([old.port, new.port])


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tls")


def test_tls_server_verifies_both_ways(tls_dir: Path) -> None:
    files = make_tls_files(tls_dir / "certs")
    with tls_server(tls_dir / "optional", files, auth_clients="optional") as server:
        url = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={files.ca_file}"
        with redis.Redis.from_url(url) as client:
            assert client.ping()
        with redis.Redis.from_url(url, ssl_certfile=str(files.client_cert)) as client:
            assert client.ping()
        wrong_ca = make_untrusted_ca(tls_dir / "other")
        wrong = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={wrong_ca}"
        with (redis.Redis.from_url(wrong, retry=None) as client,
              pytest.raises(redis.ConnectionError, match=r"(?i)certificate verify failed")):
            client.ping()


def test_tls_server_requiring_client_certificates_refuses_clients_without_one(
        tls_dir: Path) -> None:
    files = make_tls_files(tls_dir / "certs-mutual")
    with tls_server(tls_dir / "mutual", files, auth_clients="yes") as server:
        url = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={files.ca_file}"
        with redis.Redis.from_url(url, ssl_certfile=str(files.client_cert)) as client:
            assert client.ping()
        with (redis.Redis.from_url(url, retry=None) as client,
              pytest.raises(redis.ConnectionError)):
            client.ping()


class _Squatter(ServerProcess):
    """A process that never binds its port: whatever answers there is someone else."""

    def launch(self) -> None:
        self.process = subprocess.Popen(["sleep", "30"])


def test_a_port_served_by_another_process_is_an_error_not_a_server(own_server: ServerProcess,
                                                                    tmp_path: Path) -> None:
    """A second test run on the machine can take a port between free_port() and the bind: the
    other server's PONG must not pass for ours (seen once: a Sentinel set whose third
    sentinel's port answered as a data node)."""
    squatter = _Squatter(own_server.binary, tmp_path / "squatter", port=own_server.port,
                         password=own_server.password)
    try:
        with pytest.raises(TopologyError, match="served by another process"):
            squatter.start()
    finally:
        squatter.stop()
