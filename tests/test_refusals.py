"""Refusals on real servers (Valkey and Redis 7.0): a wrong password or an ACL refusal is exit 77
and one line naming the user and what was refused, never "unreachable", never retried; the
Python API raises :class:`NotPermitted`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import streambus
from streambus.errors import NotPermitted
from streambus.testing.sentinel import LocalSentinelSet
from streambus.testing.servers import ServerProcess, server_binaries
from tests.clitools import Cli, one_line_message
from tests.conftest import SERVER_KINDS

ADMIN_PASSWORD = "admin-s3cret"
USERS = [
    "user outsider on >outsider-pw ~other:* +@all",  # every command, no key of ours
    "user noxadd on >noxadd-pw ~* +@all -xadd",  # scripts run, but their XADD is refused
]


@pytest.fixture(scope="module", params=sorted(SERVER_KINDS))
def secured(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[ServerProcess]:
    """A server with a password and users whose ACLs refuse parts of the bus."""
    kind: str = request.param
    server = ServerProcess(SERVER_KINDS[kind], tmp_path_factory.mktemp(f"acl-{kind}"),
                           password=ADMIN_PASSWORD, config=USERS)
    server.start()
    yield server
    server.stop()


def url_of(server: ServerProcess, user: str | None, password: str | None) -> str:
    auth = f"{user or ''}:{password}@" if password is not None else ""
    return f"redis://{auth}127.0.0.1:{server.port}/0"


@pytest.mark.parametrize("command", [["signal", "sw", "ch"], ["status", "sw"],
                                     ["wait", "sw", "c1", "ch", "--timeout", "5s"]])
def test_wrong_password_is_exit_77_naming_the_user_never_the_password(
        cli: Cli, secured: ServerProcess, command: list[str]) -> None:
    started = time.monotonic()
    result = cli.run(*command, "--redis-url", url_of(secured, "alice", "wrong-pw-123"))
    assert result.returncode == 77, result.stderr
    line = one_line_message(result.stderr)
    assert line == ("streambus: authentication failed for user 'alice': "
                    "invalid username-password pair or user is disabled")
    assert "wrong-pw-123" not in result.stderr + result.stdout
    assert time.monotonic() - started < 10  # no reconnect loop


def test_missing_password_is_exit_77(cli: Cli, secured: ServerProcess) -> None:
    result = cli.run("signal", "sw", "ch", "--redis-url", url_of(secured, None, None))
    assert result.returncode == 77
    assert one_line_message(result.stderr) == (
        "streambus: authentication failed for user 'default': the server requires a password "
        "and the URL gives none")


def test_password_from_the_environment_is_never_printed(cli: Cli, secured: ServerProcess
                                                         ) -> None:
    result = cli.run("status", "sw", env={"STREAMBUS_REDIS_URL": url_of(secured, "", "nope-42")})
    assert result.returncode == 77
    assert "nope-42" not in result.stderr + result.stdout


def test_wait_with_a_long_reconnect_budget_is_not_retried(cli: Cli, secured: ServerProcess
                                                          ) -> None:
    started = time.monotonic()
    result = cli.run("wait", "sw", "c1", "ch", "--reconnect-budget", "5m",
                     "--redis-url", url_of(secured, "alice", "bad"))
    assert result.returncode == 77
    assert time.monotonic() - started < 10


def test_acl_refused_key_is_exit_77_naming_script_and_keys(cli: Cli, secured: ServerProcess
                                                           ) -> None:
    result = cli.run("signal", "sw", "ch", "--signal-id", "s1", "--namespace", "ns",
                     "--redis-url", url_of(secured, "outsider", "outsider-pw"))
    assert result.returncode == 77
    line = one_line_message(result.stderr)
    assert line.startswith("streambus: not permitted: ")
    assert "user 'outsider'" in line
    assert "script 'publish' on ns:{sw}:dedupe:s1, ns:{sw}:ch:ch" in line
    assert "outsider-pw" not in line


def test_acl_refused_plain_read_names_command_and_key(cli: Cli, secured: ServerProcess) -> None:
    result = cli.run("status", "sw", "--namespace", "ns",
                     "--redis-url", url_of(secured, "outsider", "outsider-pw"))
    assert result.returncode == 77
    assert "ZRANGE on ns:{sw}:coordinators" in one_line_message(result.stderr)


def test_acl_refusal_inside_a_script_has_no_script_line_number(cli: Cli, secured: ServerProcess
                                                               ) -> None:
    result = cli.run("signal", "sw", "ch", "--signal-id", "s2",
                     "--redis-url", url_of(secured, "noxadd", "noxadd-pw"))
    assert result.returncode == 77
    line = one_line_message(result.stderr)
    assert "script 'publish'" in line
    assert "@user_script" not in line
    assert "script:" not in line


@pytest.mark.anyio
async def test_api_raises_not_permitted(secured: ServerProcess) -> None:
    with pytest.raises(NotPermitted, match="authentication failed for user 'alice'"):
        async with streambus.connect(url_of(secured, "alice", "wrong")):
            pass  # pragma: no cover
    async with streambus.connect(url_of(secured, "noxadd", "noxadd-pw"), namespace="api") as bus:
        with pytest.raises(NotPermitted, match="script 'publish'") as caught:
            await bus.publish("sw", "ch", {"verdict": "PASS"})
        assert "noxadd-pw" not in str(caught.value)


def test_a_sentinel_refusing_the_password_is_exit_77_not_unreachable(
    cli: Cli, tmp_path: Path
) -> None:
    """redis-py's master discovery takes a sentinel that refuses our credentials for one that
    is down; the store asks one directly, so the refusal is reported as such."""
    with LocalSentinelSet(tmp_path / "sentinels", server_binaries()["valkey"],
                          replicas=0) as sentinels:
        for sentinel in sentinels.sentinels:
            with sentinel.client() as client:
                client.execute_command("ACL", "SETUSER", "default", "on", ">sentinel-pw",
                                       "~*", "&*", "+@all")
        url = f"{sentinels.url}?sentinel_password=not-the-password"
        result = cli.run("status", "--redis-url", url)
        assert result.returncode == 77, result.stderr
        line = one_line_message(result.stderr)
        assert "authentication failed" in line, line
        assert "not-the-password" not in result.stderr
