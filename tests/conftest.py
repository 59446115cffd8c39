from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import streambus
from streambus.bus import Bus
from tests.clitools import Cli
from tests.servers import ServerProcess, server_binaries
from tests.topology_fixtures import local_cluster, local_sentinel_set  # noqa: F401 (fixtures)

SERVER_KINDS = server_binaries()
DOCKER_OPT_IN = os.environ.get("STREAMBUS_TEST_DOCKER") == "1"
"""Opt-in: also run the shared-server tests against a Redis container (testcontainers)."""


@pytest.fixture(scope="session",
                params=sorted(SERVER_KINDS) + (["docker"] if DOCKER_OPT_IN else []))
def redis_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[str]:
    """One server per kind for the session; tests isolate themselves with a namespace."""
    kind: str = request.param
    if kind == "docker":
        yield from _container_url()
        return
    server = ServerProcess(SERVER_KINDS[kind], tmp_path_factory.mktemp(kind)).start()
    yield server.url
    server.stop()


def _container_url() -> Iterator[str]:
    from testcontainers.redis import RedisContainer

    with RedisContainer("redis:7.2") as container:
        host = container.get_container_host_ip()
        yield f"redis://{host}:{container.get_exposed_port(6379)}/0"


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def bus(redis_url: str, namespace: str) -> AsyncIterator[Bus]:
    async with streambus.connect(redis_url, namespace=namespace) as connected:
        yield connected


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A Valkey of this test's own, with AOF on, for tests that kill/freeze/restart it."""
    server = ServerProcess(server_binaries()["valkey"], tmp_path / "valkey", appendonly=True)
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.thaw()  # a test may end with the server frozen
    server.stop()


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    """Runs ``python -m streambus``; kills every process it started at teardown."""
    runner = Cli(tmp_path / "streambus-home")
    yield runner
    runner.close()


@pytest.fixture
def bus_args(redis_url: str, namespace: str) -> list[str]:
    return ["--redis-url", redis_url, "--namespace", namespace]
