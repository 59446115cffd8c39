"""Plan scenario 4 with a real link cut: the server and the waiter share a network namespace
whose only link (loopback) is taken down and brought back up.

Needs root and ``ip netns`` (skipped, with the reason, where the machine does not allow it).
All traffic stays on 127.0.0.1 inside a namespace the test creates and deletes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from streambus.server import binary_path


def _netns_available() -> str | None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2"
    name = f"sbprobe{uuid.uuid4().hex[:6]}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, check=False)
    if probe.returncode != 0:
        return f"ip netns add failed: {probe.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", name], check=False)
    return None


UNAVAILABLE = _netns_available()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))


class Namespace:
    """A network namespace with its own loopback, and processes run inside it."""

    def __init__(self, tmp_path: Path) -> None:
        self.name = f"sb{uuid.uuid4().hex[:8]}"
        self.tmp_path = tmp_path
        self.processes: list[subprocess.Popen[bytes]] = []
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.link(up=True)

    def link(self, *, up: bool) -> None:
        subprocess.run(["ip", "netns", "exec", self.name, "ip", "link", "set", "lo",
                        "up" if up else "down"], check=True)

    def start(self, *args: str, log: str) -> subprocess.Popen[bytes]:
        with (self.tmp_path / log).open("wb") as out:
            process = subprocess.Popen(["ip", "netns", "exec", self.name, *args],
                                       stdout=out, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.name, *args], capture_output=True,
                              text=True, timeout=30, check=False)

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        subprocess.run(["ip", "netns", "del", self.name], check=False)


@pytest.fixture
def netns(tmp_path: Path) -> Iterator[Namespace]:
    namespace = Namespace(tmp_path)
    yield namespace
    namespace.close()


def _cli(netns: Namespace, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return netns.run(sys.executable, "-m", "streambus", *args, "--redis-url", url,
                     "--namespace", "cut")


def _until(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_waiter_survives_a_real_link_cut(netns: Namespace, tmp_path: Path) -> None:
    port = 6390
    url = f"redis://127.0.0.1:{port}/0"
    netns.start(str(binary_path()), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes", "--dir", str(tmp_path), log="server.log")
    _until(lambda: _cli(netns, url, "status", "sw", "--json").returncode == 0)
    waiter = netns.start(sys.executable, "-m", "streambus", "wait", "sw", "c", "ch",
                         "--timeout", "60s", "--redis-url", url, "--namespace", "cut",
                         log="waiter.log")

    def waiting() -> bool:
        status = _cli(netns, url, "status", "sw", "--json")
        rows = json.loads(status.stdout or "{}").get("coordinators", [])
        return any(r["coordinator"] == "c" and r["state"] == "waiting" for r in rows)

    _until(waiting)
    netns.link(up=False)
    cut_at = time.monotonic()
    # The cut itself: longer than the blocking read's socket timeout (BLOCK 2 s + 1 s).
    while time.monotonic() - cut_at < 4.0:
        assert waiter.poll() is None, "the waiter must not give up during the cut"
        time.sleep(0.1)
    netns.link(up=True)
    published = _cli(netns, url, "signal", "sw", "ch", "--payload", '"after the cut"',
                     "--await-ack", "c", "--ack-timeout", "10s")
    assert published.returncode == 0, published.stderr
    assert waiter.wait(timeout=15) == 0
    received = json.loads((tmp_path / "waiter.log").read_text().splitlines()[-1])
    assert received["payload"] == "after the cut"
    assert received["signal_id"] == json.loads(published.stdout)["signal_id"]


def test_a_link_cut_past_the_reconnect_budget_ends_the_wait_unavailable(
    netns: Namespace, tmp_path: Path
) -> None:
    """The budget counts a cut link (no answer, no refusal) like a dead server: exit 4, long
    before the wait's deadline."""
    port = 6391
    url = f"redis://127.0.0.1:{port}/0"
    netns.start(str(binary_path()), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                log="server.log")
    _until(lambda: _cli(netns, url, "status", "sw", "--json").returncode == 0)
    waiter = netns.start(sys.executable, "-m", "streambus", "wait", "sw", "c", "ch",
                         "--timeout", "120s", "--reconnect-budget", "1s", "--redis-url", url,
                         "--namespace", "cut", log="waiter.log")

    def waiting() -> bool:
        status = _cli(netns, url, "status", "sw", "--json")
        rows = json.loads(status.stdout or "{}").get("coordinators", [])
        return any(r["coordinator"] == "c" and r["state"] == "waiting" for r in rows)

    _until(waiting)
    netns.link(up=False)
    try:
        assert waiter.wait(timeout=60) == 4  # exit 4: the bus cannot be reached
    finally:
        netns.link(up=True)
    assert "reconnect budget" in (tmp_path / "waiter.log").read_text()
