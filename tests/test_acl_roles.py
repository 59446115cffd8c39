"""The ACL roles of ``streambus acl ROLE``, applied with ``ACL SETUSER`` on real servers (Valkey
and Redis 7.0): each role does its job through the real CLI and API, and every operation
outside it (another swarm, another role's job, FLUSHALL, CONFIG, KEYS, @dangerous commands) is
refused: exit 77 from the CLI, ``NoPermissionError`` from a raw client."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import anyio
import pytest
import redis

import streambus
from consumers.metrics import SwarmEvents
from consumers.watchdog import Watchdog
from streambus.acl import acl_rules
from streambus.errors import NotPermitted
from streambus.testing.servers import ServerProcess
from tests.clitools import Cli, finish, one_json_object, one_line_message
from tests.conftest import SERVER_KINDS
from tests.fakes import until

ADMIN_PASSWORD = "root-pw"
NS = "acl"
SWARM = "sw"
USERS = {  # user -> (role, swarm or None for the whole namespace)
    "agent": ("agent", SWARM),
    "agent-ns": ("agent", None),
    "observer": ("observer", SWARM),
    "observer-ns": ("observer", None),
    "projector": ("projector", SWARM),
    "admin": ("admin", None),
}


@dataclass
class Secured:
    server: ServerProcess

    def url(self, user: str) -> str:
        return f"redis://{user}:{user}-pw@127.0.0.1:{self.server.port}/0"

    def args(self, user: str) -> list[str]:
        return ["--redis-url", self.url(user), "--namespace", NS]

    def client(self, user: str) -> redis.Redis:
        return redis.Redis(port=self.server.port, username=user, password=f"{user}-pw",
                           socket_timeout=2)


@pytest.fixture(scope="module", params=sorted(SERVER_KINDS))
def secured(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Secured]:
    """A server whose users get their rules from the real ``streambus acl`` command."""
    kind: str = request.param
    server = ServerProcess(SERVER_KINDS[kind], tmp_path_factory.mktemp(f"roles-{kind}"),
                           password=ADMIN_PASSWORD)
    server.start()
    cli = Cli(tmp_path_factory.mktemp("home"))
    try:
        with server.client() as root:
            for user, (role, swarm) in USERS.items():
                result = cli.run("acl", role, "--namespace", NS,
                                 *(["--swarm", swarm] if swarm else []))
                assert result.returncode == 0, result.stderr
                rules = result.stdout.strip()
                assert "\n" not in rules
                root.execute_command("ACL", "SETUSER", user, "on", f">{user}-pw",
                                     *rules.split())
        yield Secured(server)
    finally:
        cli.close()
        server.stop()


def refused(result: object) -> str:
    assert getattr(result, "returncode", None) == 77, result
    line = one_line_message(result.stderr)  # type: ignore[attr-defined]
    assert line.startswith("streambus: not permitted"), line
    return line


# -- agent ----------------------------------------------------------------------------------------

def agent_job(cli: Cli, agent: list[str]) -> None:
    """An agent's whole job through the CLI (``agent``: its bus arguments): wait with
    heartbeats and a watched peer, signal awaiting the ACK, a retry request, status."""
    waiter = cli.start("wait", SWARM, "c1", "go", "--timeout", "20s", "--heartbeat-interval",
                       "100ms", "--watch", "c2", "--dead-after", "30s", *agent)
    sent = cli.run("signal", SWARM, "go", "--signal-id", "go-1", "--payload", '{"ok": 1}',
                   "--await-ack", "c1", "--ack-timeout", "15s", *agent)
    assert sent.returncode == 0, sent.stderr
    assert one_json_object(sent.stdout)["acked_by"] == ["c1"]
    code, out, err = finish(waiter)
    assert code == 0, err
    assert one_json_object(out)["payload"] == {"ok": 1}
    retry = cli.run("retry", SWARM, "c1", "--reason", "redo", *agent)
    assert retry.returncode == 0, retry.stderr
    status = cli.run("status", SWARM, "--json", *agent)
    assert status.returncode == 0, status.stderr


def test_agent_signals_waits_acknowledges_heartbeats_and_retries(cli: Cli, secured: Secured
                                                                 ) -> None:
    agent_job(cli, secured.args("agent"))


def blocked_reads(node: ServerProcess, user: str) -> int:
    """How many clients of ``user`` are blocked in a stream read on ``node`` now."""
    with node.client() as root:
        return sum(1 for c in root.client_list() if c["user"] == user
                   and c["cmd"] in ("xread", "xreadgroup") and "b" in c["flags"])


@pytest.mark.anyio
async def test_agent_waits_of_one_process_share_the_dispatcher(secured: Secured) -> None:
    """Several waiters: the dispatcher's XREAD, its scripted group reads and CLIENT UNBLOCK.

    The later waiters arrive, on another channel, while the first one's read blocks
    (``block_ms`` far beyond the test's bound), and their signal comes first: only an
    interruption by CLIENT UNBLOCK serves them in time."""
    await waiters_join_a_blocked_read(secured.url("agent"), secured.server)


async def waiters_join_a_blocked_read(url: str, master: ServerProcess) -> None:
    """Waiters join, on another channel, while the first one's read blocks on ``master``
    (``block_ms`` far beyond the bound here) and their signal comes first: served in time
    only if the dispatcher interrupts its read (CLIENT UNBLOCK)."""
    async with streambus.connect(url, namespace=NS, block_ms=60_000) as bus:
        got: dict[str, str] = {}

        async def wait(coordinator: str, channel: str) -> None:
            delivery = await bus.wait_for(SWARM, coordinator, channel, timeout=15)
            got[coordinator] = delivery.signal.signal_id

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait, "m0", "many-a")
                await until(lambda: blocked_reads(master, "agent") == 1, within=5)
                for n in range(1, 3):
                    tg.start_soon(wait, f"m{n}", "many-b")
                await bus.publish(SWARM, "many-b", None, signal_id="b-1",
                                  await_acks=["m1", "m2"], ack_timeout=8)
                await bus.publish(SWARM, "many-a", None, signal_id="a-1", await_acks=["m0"],
                                  ack_timeout=8)
        assert got == {"m0": "a-1", "m1": "b-1", "m2": "b-1"}


def test_agent_of_one_swarm_cannot_touch_another(cli: Cli, secured: Secured) -> None:
    line = refused(cli.run("signal", "other", "go", "--signal-id", "x1",
                           *secured.args("agent")))
    assert "acl:{other}:ch:go" in line
    refused(cli.run("wait", "other", "c1", "go", "--timeout", "1s", *secured.args("agent")))


def test_namespace_agent_reaches_every_swarm_of_its_namespace_only(cli: Cli, secured: Secured
                                                                   ) -> None:
    ok = cli.run("signal", "any-swarm", "go", *secured.args("agent-ns"))
    assert ok.returncode == 0, ok.stderr
    refused(cli.run("signal", SWARM, "go", "--redis-url", secured.url("agent-ns"),
                    "--namespace", "elsewhere"))


def test_agent_cannot_clean_up_or_list_swarms(cli: Cli, secured: Secured) -> None:
    assert "SCAN" in refused(cli.run("cleanup", "--log-file", "/dev/null",
                                     *secured.args("agent")))
    refused(cli.run("status", *secured.args("agent")))


# -- observer -------------------------------------------------------------------------------------

def test_observer_runs_status_read_only(cli: Cli, secured: Secured) -> None:
    beat = cli.run("wait", SWARM, "seen", "nothing", "--timeout", "50ms", *secured.args("agent"))
    assert beat.returncode == 2, beat.stderr
    one = cli.run("status", SWARM, "--json", *secured.args("observer"))
    assert one.returncode == 0, one.stderr
    rows = one_json_object(one.stdout)["coordinators"]
    assert {"coordinator": "seen", "state": "timed_out"}.items() <= next(
        r for r in rows if r["coordinator"] == "seen").items()
    every = cli.run("status", "--json", *secured.args("observer-ns"))
    assert every.returncode == 0, every.stderr
    assert SWARM in [s["swarm"] for s in one_json_object(every.stdout)["swarms"]]
    table = cli.run("status", SWARM, *secured.args("observer"))
    assert table.returncode == 0, table.stderr


@pytest.mark.anyio
async def test_observer_reads_what_metrics_scrapes(secured: Secured) -> None:
    async with streambus.connect(secured.url("agent"), namespace=NS) as bus:
        await bus.publish(SWARM, "scraped", None)
    async with streambus.connect(secured.url("observer"), namespace=NS) as bus:
        keys = bus.keys(SWARM)
        assert isinstance(await bus.census(SWARM), dict)  # a read-only script: EVALSHA_RO
        assert "scraped" in await bus.channels(SWARM)
        info = await bus.stream_info([keys.events, keys.acks, keys.channel("scraped")])
        assert info[keys.channel("scraped")].length >= 1
        assert isinstance(await bus.counters(SWARM), dict)
        assert await bus.server_time_ms() > 0
        with pytest.raises(NotPermitted):
            await bus.publish(SWARM, "scraped", None)


@pytest.mark.parametrize("command", [
    ["signal", SWARM, "go"],
    ["wait", SWARM, "c9", "go", "--timeout", "1s"],
    ["retry", SWARM, "c1"],
])
def test_observer_writes_nothing(cli: Cli, secured: Secured, command: list[str]) -> None:
    refused(cli.run(*command, *secured.args("observer-ns")))


def test_observer_cannot_clean_up(cli: Cli, secured: Secured) -> None:
    assert cli.run("wait", "gone", "old", "ch", "--timeout", "1ms",
                   *secured.args("agent-ns")).returncode == 2
    assert "script 'cleanup'" in refused(cli.run(
        "cleanup", "--stale-after", "1ms", "--log-file", "/dev/null",
        *secured.args("observer-ns")))


def test_observer_keys_are_read_only_even_for_group_reads(secured: Secured) -> None:
    with secured.client("observer") as client:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.set(f"{NS}:{{{SWARM}}}:x", 1)
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.xreadgroup("g", "c", {f"{NS}:{{{SWARM}}}:events": ">"})
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.eval("return 1", 1, f"{NS}:{{{SWARM}}}:x")  # EVAL: declared keys are writes


# -- projector ------------------------------------------------------------------------------------

@pytest.mark.anyio
async def test_projector_keeps_its_groups_and_reports_dead(secured: Secured) -> None:
    async with streambus.connect(secured.url("projector"), namespace=NS) as bus:
        await projector_job(secured.url("agent"), bus)
        with pytest.raises(NotPermitted, match="script 'publish'"):
            await bus.publish(SWARM, "proj", None)  # a projector cannot forge a signal


async def projector_job(agent_url: str, bus: streambus.Bus) -> None:
    """What the consumers do on a projector's ``bus``, after an agent (``agent_url``) left a
    lapsed heartbeat and a signal: catch up, report the dead, take the census."""
    async with streambus.connect(agent_url, namespace=NS) as agent:
        async with agent.coordinator(SWARM, "lapsing").heartbeating(0.05):
            pass
        await agent.publish(SWARM, "proj", None, signal_id="p1")
    await bus.projector(SWARM, SwarmEvents(SWARM)).catch_up()
    assert await Watchdog(bus, SWARM, dead_after=0.001).check() is not None
    assert isinstance(await bus.census(SWARM), dict)


@pytest.mark.anyio
async def test_projector_holds_a_lease_and_nothing_else_by_it(secured: Secured) -> None:
    """The trace projector's lease (GET/SET on its own key) works under the role, and those
    commands reach no other key."""
    async with streambus.connect(secured.url("projector"), namespace=NS) as bus:
        lease = bus.lease(SWARM, "traces", ttl=5)
        await lease.acquire()
        assert lease.held
        await lease.release()
    with secured.server.client() as root:  # released, not left to lapse: a standby takes over
        assert root.exists(f"{NS}:{{{SWARM}}}:leases:traces") == 0
    with (redis.Redis.from_url(secured.url("projector")) as client,
          pytest.raises(redis.exceptions.NoPermissionError)):
        client.set(f"{NS}:{{{SWARM}}}:events", 1)


def test_projector_cannot_clean_up(cli: Cli, secured: Secured) -> None:
    assert cli.run("wait", SWARM, "old", "ch", "--timeout", "1ms",
                   *secured.args("agent")).returncode == 2
    refused(cli.run("cleanup", "--swarm", SWARM, "--stale-after", "1ms", "--log-file",
                    "/dev/null", *secured.args("projector")))


# -- admin ----------------------------------------------------------------------------------------

def test_admin_cleans_up(cli: Cli, secured: Secured) -> None:
    assert cli.run("wait", "stale", "old", "ch", "--timeout", "1ms",
                   *secured.args("agent-ns")).returncode == 2
    result = cli.run("cleanup", "--swarm", "stale", "--stale-after", "1ms", "--json",
                     "--log-file", "/dev/null", *secured.args("admin"))
    assert result.returncode == 0, result.stderr
    assert one_json_object(result.stdout)["removed_total"] == 1


# -- every role -----------------------------------------------------------------------------------

@pytest.mark.parametrize("user", sorted(USERS))
@pytest.mark.parametrize("command", [
    ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("LASTSAVE",),
    ("CLIENT", "KILL", "ID", "1"), ("CLIENT", "LIST"), ("SHUTDOWN", "NOSAVE"), ("INFO",),
    ("ACL", "LIST"), ("MONITOR",), ("MODULE", "LIST"), ("SORT", f"{NS}:{{{SWARM}}}:x"),
], ids=lambda c: " ".join(c) if isinstance(c, tuple) else c)
def test_no_role_runs_dangerous_commands(secured: Secured, user: str,
                                         command: tuple[str, ...]) -> None:
    with secured.client(user) as client, pytest.raises(redis.exceptions.NoPermissionError):
        client.execute_command(*command)
    assert secured.server.alive


@pytest.mark.parametrize("user", sorted(USERS))
def test_no_role_reaches_keys_outside_its_namespace(secured: Secured, user: str) -> None:
    with secured.client(user) as client, pytest.raises(redis.exceptions.NoPermissionError):
        client.hgetall("elsewhere:{sw}:counters")


@pytest.mark.anyio
async def test_a_refused_read_ends_the_wait_not_the_dispatcher(secured: Secured) -> None:
    """A user that may start a wait but not read its channel (a role edited by hand): the
    wait ends with NotPermitted at once, never at its deadline, and the bus serves on."""
    rules = acl_rules("agent", NS, SWARM).split()
    with secured.server.client() as root:
        root.execute_command("ACL", "SETUSER", "noread", "on", ">noread-pw", *rules,
                             "-xreadgroup")
    url = f"redis://noread:noread-pw@127.0.0.1:{secured.server.port}/0"
    async with streambus.connect(url, namespace=NS) as bus:
        for _ in range(2):  # the second wait finds the dispatcher still serving
            with anyio.fail_after(10), pytest.raises(NotPermitted, match="user 'noread'"):
                await bus.wait_for(SWARM, "blind", "ch", timeout=60)
