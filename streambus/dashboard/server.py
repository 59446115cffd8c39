"""Serving the dashboard: uvicorn on a socket we bind, inside the caller's task group.

uvicorn normally owns the process (it installs SIGINT/SIGTERM handlers and calls
``sys.exit`` when it cannot bind). Here the CLI owns both: signals arrive through
:func:`streambus.process.run_interruptible`, which cancels :func:`serve`; :func:`serve` then
ends every live feed, asks uvicorn to shut down gracefully and waits (shielded, bounded) for
it. The socket is bound before uvicorn starts, so a port in use is a
:class:`~streambus.errors.StreambusError`, not an exit from inside a library.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Final

import anyio
import anyio.abc
import uvicorn

from streambus.bus import Bus
from streambus.dashboard.app import create_app
from streambus.dashboard.feeds import Hub
from streambus.dashboard.reads import DashboardOptions
from streambus.errors import StreambusError

log = logging.getLogger(__name__)

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8765
SHUTDOWN_S: Final = 5.0


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling; reports when it is listening."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = anyio.Event()
        self.finished = anyio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the CLI's run_interruptible handles SIGINT/SIGTERM

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.listening.set()


def url_of(host: str, port: int) -> str:
    """The dashboard's URL on ``host:port``."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one); errors as StreambusError."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
    except (OSError, OverflowError) as exc:
        raise StreambusError(f"cannot serve the dashboard on {host}:{port}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(128)
    except (OSError, OverflowError) as exc:
        sock.close()
        raise StreambusError(f"cannot serve the dashboard on {host}:{port}: {exc}") from None
    return sock


async def serve(bus: Bus, options: DashboardOptions | None = None, *,
                host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                on_ready: Callable[[str], None] = lambda url: None, hub: Hub | None = None,
                task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve the dashboard of ``bus`` on ``host:port`` until cancelled.

    Once it listens, ``on_ready`` gets its URL (also reported through ``task_status``, so
    ``url = await tg.start(serve, bus)`` works). Port 0 picks a free port. ``hub``: the feeds'
    hub to use (tests look at it), by default a new one polling every ``options.interval``.
    """
    options = options or DashboardOptions()
    sock = bind(host, port)
    url = url_of(host, sock.getsockname()[1])
    hub = hub or Hub(interval=options.interval)
    config = uvicorn.Config(create_app(bus, hub, options, host=host), lifespan="off",
                            http="h11", ws="none", log_level="warning", access_log=False,
                            timeout_graceful_shutdown=2)
    server = _Server(config)
    async with anyio.create_task_group() as tg:
        await tg.start(hub.run)
        tg.start_soon(_run_shielded, server, sock)
        try:
            await server.listening.wait()
            log.info("dashboard of namespace %s at %s", bus.namespace, url)
            on_ready(url)
            task_status.started(url)
            await anyio.sleep_forever()
        finally:
            hub.close()  # every SSE stream ends, so uvicorn's graceful shutdown is quick
            server.should_exit = True
            with anyio.CancelScope(shield=True), anyio.move_on_after(SHUTDOWN_S):
                await server.finished.wait()
            sock.close()


async def _run_shielded(server: _Server, sock: socket.socket) -> None:
    """Run uvicorn; shielded, so a cancel reaches it only as ``should_exit`` (see serve)."""
    try:
        with anyio.CancelScope(shield=True):
            await server.serve(sockets=[sock])
    finally:
        server.finished.set()
        server.listening.set()  # never leave serve() waiting on a server that did not start
