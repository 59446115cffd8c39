"""The embedded server: started once per user, found again, replaced when dead, durable.

Every test gets its own state directory (``STREAMBUS_HOME``) and stops whatever server it
started, so none of them touches the user's real embedded server or leaves one running.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from streambus.server import ServerInfo, ensure_server, read_info, stop_server

PROCESS_TIMEOUT_S = 20.0


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def until_dead(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            pytest.fail(f"process {pid} still alive after {timeout} s")
        time.sleep(0.01)


@dataclass
class Home:
    """A throwaway state directory, and every server pid a test saw in it (for the teardown)."""

    path: Path
    pids: set[int] = field(default_factory=set)

    def ensure(self) -> ServerInfo:
        info = ensure_server(self.path)
        self.pids.add(info.pid)
        return info

    def client(self, info: ServerInfo) -> redis.Redis:
        return redis.Redis.from_url(info.url, socket_timeout=5)

    def servers_running_here(self) -> set[int]:
        """Servers whose working directory is in this home (a server chdirs to its data dir).

        Catches servers a failing test never learnt the pid of (say, two started at once).
        """
        found = set()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cwd = os.readlink(proc / "cwd")
            except OSError:
                continue
            if cwd.startswith(str(self.path) + os.sep):
                found.add(int(proc.name))
        return found

    def cleanup(self) -> None:
        if (info := read_info(self.path)) is not None:
            self.pids.add(info.pid)
        stop_server(self.path)
        self.pids |= self.servers_running_here()
        pids = {pid for pid in self.pids if pid > 0 and alive(pid)}
        for pid in pids:
            os.kill(pid, signal.SIGTERM)  # a server shuts down cleanly on SIGTERM
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.01)
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            until_dead(pid)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Home]:
    path = tmp_path / "streambus-home"
    monkeypatch.setenv("STREAMBUS_HOME", str(path))
    monkeypatch.delenv("STREAMBUS_REDIS_URL", raising=False)
    monkeypatch.delenv("STREAMBUS_NAMESPACE", raising=False)
    state = Home(path)
    yield state
    state.cleanup()


def test_ensure_server_starts_a_private_durable_local_server(home: Home) -> None:
    info = home.ensure()
    assert info.pid > 0
    assert alive(info.pid)
    assert info.url.startswith("redis://:")
    assert f"@127.0.0.1:{info.port}/" in info.url
    assert read_info(home.path) == info

    client = home.client(info)
    try:
        assert client.ping() is True
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert client.config_get("bind") == {"bind": "127.0.0.1"}
        assert client.config_get("port") == {"port": str(info.port)}
        # The pid in server.json is the server's own, not a launcher's.
        assert int(client.info("server")["process_id"]) == info.pid
    finally:
        client.close()

    # The password is required: a client that does not give it is refused.
    with socket.create_connection(("127.0.0.1", info.port), timeout=5) as anonymous:
        anonymous.sendall(b"PING\r\n")
        reply = anonymous.recv(256)
    assert reply.startswith(b"-NOAUTH"), reply

    # The files holding the password are private to the user.
    for name in ("server.json", "password", "valkey.conf"):
        mode = stat.S_IMODE((home.path / name).stat().st_mode)
        assert mode & 0o077 == 0, f"{name} is mode {oct(mode)}"


def test_a_second_ensure_server_reuses_the_running_server(home: Home) -> None:
    first = home.ensure()
    client = home.client(first)
    try:
        run_id = client.info("server")["run_id"]
        client.set("marker", "first-server")
        second = home.ensure()
        assert second == first
        assert client.info("server")["run_id"] == run_id
    finally:
        client.close()
    assert read_info(home.path) == first


def test_a_killed_server_is_replaced_by_a_new_one(home: Home) -> None:
    first = home.ensure()
    os.kill(first.pid, signal.SIGKILL)
    until_dead(first.pid)

    second = home.ensure()
    assert second.pid != first.pid
    assert alive(second.pid)
    assert read_info(home.path) == second
    client = home.client(second)
    try:
        assert client.ping() is True
        assert int(client.info("server")["process_id"]) == second.pid
    finally:
        client.close()


def test_data_survives_a_clean_stop_and_restart(home: Home) -> None:
    first = home.ensure()
    client = home.client(first)
    try:
        entry_id = client.xadd("probe-stream", {"e": b'{"type":"heartbeat","coordinator":"c"}'})
        client.xadd("probe-stream", {"e": b"second"})
        client.xgroup_create("probe-stream", "waiters", id="0")
        # One entry delivered to a consumer but not acknowledged: it must stay pending.
        client.xreadgroup("waiters", "coord-a", {"probe-stream": ">"}, count=1)
    finally:
        client.close()

    stopped = stop_server(home.path)
    assert stopped == first
    until_dead(first.pid)
    assert read_info(home.path) is None

    second = home.ensure()
    assert second.pid != first.pid
    client = home.client(second)
    try:
        entries = client.xrange("probe-stream")
        assert len(entries) == 2
        assert entries[0] == (entry_id, {b"e": b'{"type":"heartbeat","coordinator":"c"}'})
        [group] = client.xinfo_groups("probe-stream")
        assert group["name"] == b"waiters"
        assert group["last-delivered-id"] == entry_id
        assert group["pending"] == 1
    finally:
        client.close()


def test_stop_server_without_a_server_is_a_no_op(home: Home) -> None:
    assert stop_server(home.path) is None


def _cli_env(home: Home) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMBUS_")}
    env["STREAMBUS_HOME"] = str(home.path)
    return env


def _run_cli(home: Home, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streambus", *args], env=_cli_env(home),
                          capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S,
                          check=False)


def test_cli_without_a_url_uses_one_embedded_server(home: Home) -> None:
    assert read_info(home.path) is None
    sent = _run_cli(home, "signal", "sw", "ch", "--payload", '{"via": "embedded"}')
    assert "Traceback" not in sent.stderr
    assert sent.returncode == 0, sent.stderr
    started = read_info(home.path)
    assert started is not None, "the CLI did not start the embedded server"
    home.pids.add(started.pid)
    assert alive(started.pid)

    got = _run_cli(home, "wait", "sw", "coord", "ch", "--timeout", "10s")
    assert got.returncode == 0, got.stderr
    sent_obj, got_obj = json.loads(sent.stdout), json.loads(got.stdout)
    assert got_obj["signal_id"] == sent_obj["signal_id"]
    assert got_obj["payload"] == {"via": "embedded"}

    reused = read_info(home.path)
    assert reused == started, "the second process started another server"
    client = home.client(started)
    try:
        assert client.keys("streambus:{sw}:*"), "nothing in the default namespace"
    finally:
        client.close()


_CONCURRENT = """
import sys, time
from pathlib import Path
from streambus.server import ensure_server
go = Path(sys.argv[2])
print("ready", flush=True)
deadline = time.monotonic() + 15
while not go.exists():
    if time.monotonic() > deadline:
        raise SystemExit("never told to go")
    time.sleep(0.001)
print(ensure_server(Path(sys.argv[1])).pid, flush=True)
"""


def test_concurrent_first_users_start_only_one_server(home: Home, tmp_path: Path) -> None:
    go = tmp_path / "go"
    processes = [
        subprocess.Popen([sys.executable, "-c", _CONCURRENT, str(home.path), str(go)],
                         env=_cli_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for _ in range(4)
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready"
        go.touch()  # all imported and waiting: release them together
        pids = []
        for process in processes:
            out, err = process.communicate(timeout=PROCESS_TIMEOUT_S)
            assert process.returncode == 0, err
            pids.append(int(out.strip()))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    home.pids.update(pids)
    assert len(set(pids)) == 1, f"started {len(set(pids))} servers: {pids}"
    info = read_info(home.path)
    assert info is not None
    assert info.pid == pids[0]
    assert alive(info.pid)
