"""Where a key lives: one plain redis-py client per master, for one server, a Sentinel set or a
Redis Cluster alike.

Every key of a swarm carries the swarm's hash tag, so a swarm lives in one slot, on one master.
The store therefore talks to that master through a plain client, exactly as it talks to a single
server: the same scripts, the same pipelines, ``WAIT``/``WAITAOF`` on the connection that took
the write. Only *which* master is the topology's business:

* one server: the URL's;
* Sentinel: the one the sentinels name, asked again after every connection loss and every
  second (a replaced master can accept writes for seconds before Sentinel reconfigures it, and
  those writes are then discarded: see ``docs/topologies.md``);
* Cluster: the master of the key's slot, from a slot map asked from any reachable node and asked
  again after any ``MOVED``, ``ASK``, ``CLUSTERDOWN``, ``READONLY`` or connection loss.

redis-py's own cluster client is not used: it routes every ``XREADGROUP`` through an extra
``COMMAND GETKEYS``, cannot pipeline ``EVALSHA``, and on some errors closes every connection of
the process, so one master failing over would end the blocked reads of waiters on healthy
masters. Here a failing master touches only the connections to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Final

import anyio
import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.crc import key_slot

from streambus.errors import BusUnavailable
from streambus.store._errors import remember_command, translated
from streambus.store.urls import Endpoint

SOCKET_TIMEOUT_S: Final = 5.0
CONNECT_TIMEOUT_S: Final = 2.0
TOPOLOGY_QUERY_S: Final = 1.0
"""How long one node or sentinel may take to say where the masters are."""
SENTINEL_RECHECK_S: Final = 1.0
RECHECK_LIMIT_S: Final = 0.25
"""A periodic recheck (no error seen) waits this long at most, then keeps the known master."""
Address = tuple[str, int]


class _Client(aioredis.Redis):
    """redis-py's client, remembering on an error reply which command drew it: a refusal
    then names the command and its keys (the server names neither the key nor, inside a
    script, the command)."""

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        except rex.ResponseError as exc:
            remember_command(exc, args)
            raise


def _no_retries() -> Retry:
    # redis-py's own command retries are off: a retried XADD can append twice and a retried
    # blocking read can strand entries in the PEL; retrying is decided above the store.
    return Retry(NoBackoff(), 0)


class Nodes:
    """The clients of one topology. :meth:`client` is the master of a key."""

    def __init__(self, endpoint: Endpoint, *, max_connections: int) -> None:
        self.endpoint = endpoint
        self.max_connections = max_connections
        self._clients: dict[Address, Any] = {}
        self._stale = True
        self._lock = anyio.Lock()
        self._recheck_s: float | None = None
        """Ask the topology again this often even without an error (Sentinel: see there)."""
        self._resolved_at = 0.0
        self._rechecking = False

    @property
    def kind(self) -> str:
        return self.endpoint.kind

    def stale(self) -> None:
        """Ask the topology again before the next command (after an error that may mean the
        master moved)."""
        self._stale = True

    async def fresh(self) -> None:
        """Resolve the topology if it is stale (one caller resolves; the others wait), or
        recheck it if it is due; a recheck that gets no answer keeps what is known."""
        if not self._stale:
            if self._recheck_due() and not self._rechecking:
                await self._recheck()
            return
        async with self._lock:
            if self._stale:
                with translated(self.endpoint.username):
                    await self._resolve()
                self._stale = False
                self._resolved_at = anyio.current_time()

    async def _recheck(self) -> None:
        """One caller asks again, bounded; the others carry on with what is known."""
        self._rechecking = True
        try:
            with (anyio.move_on_after(RECHECK_LIMIT_S), contextlib.suppress(BusUnavailable),
                  translated(self.endpoint.username)):
                await self._resolve()
        finally:
            self._rechecking = False
            self._resolved_at = anyio.current_time()

    def _recheck_due(self) -> bool:
        return (self._recheck_s is not None
                and anyio.current_time() - self._resolved_at >= self._recheck_s)

    async def _resolve(self) -> None:
        raise NotImplementedError

    def client(self, key: str) -> Any:
        """The client of the master serving ``key``."""
        raise NotImplementedError

    def masters(self) -> list[Any]:
        """One client per master (every master once)."""
        raise NotImplementedError

    def address(self, key: str) -> Address:
        raise NotImplementedError

    def _connection_kwargs(self) -> dict[str, Any]:
        e = self.endpoint
        kwargs: dict[str, Any] = {
            "db": e.db, "username": e.username, "password": e.password,
            "socket_timeout": SOCKET_TIMEOUT_S, "socket_connect_timeout": CONNECT_TIMEOUT_S,
            "retry": _no_retries(),
        }
        for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs",
                     "ssl_ca_path", "ssl_password"):
            if name in e.options:
                kwargs[name] = e.options[name]
        if "ssl_check_hostname" in e.options:
            kwargs["ssl_check_hostname"] = e.options["ssl_check_hostname"].lower() in (
                "1", "true", "yes")
        return kwargs

    def _client_at(self, address: Address) -> Any:
        if (client := self._clients.get(address)) is None:
            host, port = address
            pool = aioredis.BlockingConnectionPool(
                max_connections=self.max_connections, timeout=None, host=host, port=port,
                connection_class=SSLConnection if self.endpoint.tls else Connection,
                **self._connection_kwargs())
            client = self._clients[address] = _Client.from_pool(pool)
        return client

    def open_reader(self, key: str, *, socket_timeout: float) -> Any:
        """A new client with one connection of its own, to the master of ``key`` (call
        :meth:`fresh` first)."""
        host, port = self.address(key)
        kwargs = self._connection_kwargs() | {"socket_timeout": socket_timeout}
        if self.endpoint.tls:
            kwargs["connection_class"] = SSLConnection
        pool = aioredis.ConnectionPool(host=host, port=port, max_connections=1, **kwargs)
        reader = _Client(connection_pool=pool, single_connection_client=True)
        reader.auto_close_connection_pool = True  # closing the reader closes its connection
        return reader

    async def aclose(self) -> None:
        """Close every client (each owns its pool). Safe to call twice."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            with contextlib.suppress(Exception):
                await client.aclose()


class SingleNode(Nodes):
    """One server: the URL says it all (redis-py reads every option of the URL)."""

    def __init__(self, endpoint: Endpoint, *, max_connections: int) -> None:
        super().__init__(endpoint, max_connections=max_connections)
        self._stale = False
        pool = aioredis.BlockingConnectionPool.from_url(
            endpoint.url, max_connections=max_connections, timeout=None,
            socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=CONNECT_TIMEOUT_S,
            retry=_no_retries())
        self._only: Any = _Client.from_pool(pool)

    def client(self, key: str) -> Any:
        return self._only

    def address(self, key: str) -> Address:
        return ("", 0)  # the URL's server, whatever its address (a Unix socket, say)

    def masters(self) -> list[Any]:
        return [self._only]

    def open_reader(self, key: str, *, socket_timeout: float) -> Any:
        return _Client.from_url(
            self.endpoint.url, single_connection_client=True, socket_timeout=socket_timeout,
            socket_connect_timeout=CONNECT_TIMEOUT_S, retry=_no_retries())

    async def _resolve(self) -> None:
        return None

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self._only.aclose()


class SentinelMaster(Nodes):
    """The master a Sentinel set names for the service, asked again after connection loss."""

    def __init__(self, endpoint: Endpoint, *, max_connections: int) -> None:
        super().__init__(endpoint, max_connections=max_connections)
        sentinel_kwargs: dict[str, Any] = {
            "socket_timeout": TOPOLOGY_QUERY_S, "socket_connect_timeout": CONNECT_TIMEOUT_S,
            "retry": _no_retries(),
        }
        if endpoint.tls:
            sentinel_kwargs |= {k: v for k, v in self._connection_kwargs().items()
                                if k.startswith("ssl_")} | {"ssl": True}
        for name in ("sentinel_password", "sentinel_username"):
            if name in endpoint.options:
                sentinel_kwargs[name.removeprefix("sentinel_")] = endpoint.options[name]
        self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(endpoint.hosts), sentinel_kwargs=sentinel_kwargs)
        self._master: Address | None = None
        # A master that Sentinel replaced may go on accepting writes until it is reconfigured
        # (seconds, with no error to its clients): writes there are discarded when it becomes
        # a replica. Asking the sentinels every second bounds that window for this process;
        # `durability="replicated"` (or min-replicas-to-write on the server) closes it.
        self._recheck_s = SENTINEL_RECHECK_S

    async def _resolve(self) -> None:
        try:
            with anyio.fail_after(TOPOLOGY_QUERY_S * len(self.endpoint.hosts)):
                host, port = await self._sentinel.discover_master(self.endpoint.service)
        except Exception as exc:  # MasterNotFoundError, or every sentinel unreachable
            await self._refused_by_sentinels()
            raise BusUnavailable(
                f"no sentinel of {self.endpoint.redacted} names a master for "
                f"{self.endpoint.service!r}: {exc}") from None
        moved = self._master is not None and self._master != (host, port)
        self._master = (str(host), int(port))
        if moved:  # never write to the old master again: drop its connections
            for address in [a for a in self._clients if a != self._master]:
                with contextlib.suppress(Exception):
                    await self._clients.pop(address).aclose()

    async def _refused_by_sentinels(self) -> None:
        """redis-py's discovery treats a sentinel that refuses our credentials like one that
        is down; ask one directly, so that a wrong password is a refusal (exit 77), not an
        outage retried until a budget runs out."""
        for sentinel in self._sentinel.sentinels:
            try:
                with anyio.fail_after(TOPOLOGY_QUERY_S):
                    await sentinel.ping()
            except (rex.AuthenticationError, rex.AuthorizationError, rex.NoPermissionError):
                raise
            except Exception:  # down: the next may answer
                continue
            return

    def address(self, key: str) -> Address:
        if self._master is None:
            raise BusUnavailable(f"no master known for {self.endpoint.service!r} yet")
        return self._master

    def client(self, key: str) -> Any:
        return self._client_at(self.address(key))

    def masters(self) -> list[Any]:
        return [self.client("")]

    async def aclose(self) -> None:
        await super().aclose()
        for sentinel in self._sentinel.sentinels:
            with contextlib.suppress(Exception):
                await sentinel.aclose()


class ClusterMasters(Nodes):
    """The masters of a Redis Cluster, by slot, from ``CLUSTER SLOTS``."""

    def __init__(self, endpoint: Endpoint, *, max_connections: int) -> None:
        super().__init__(endpoint, max_connections=max_connections)
        self._slots: list[Address | None] = [None] * 16384
        self._known: list[Address] = list(endpoint.hosts)

    async def _resolve(self) -> None:
        failures: list[str] = []
        for address in dict.fromkeys([*self._masters_known(), *self._known]):
            try:
                # A frozen node accepts the connection and never answers: ask the next one.
                with anyio.fail_after(TOPOLOGY_QUERY_S):
                    reply = await self._client_at(address).execute_command("CLUSTER SLOTS")
            except (rex.AuthenticationError, rex.AuthorizationError, rex.NoPermissionError):
                raise  # refused, not unreachable: no other node will think otherwise
            except Exception as exc:
                failures.append(f"{address[0]}:{address[1]}: {exc}")
                continue
            self._apply(reply)
            return
        raise BusUnavailable(f"no node of the cluster {self.endpoint.redacted} answered "
                             f"CLUSTER SLOTS ({'; '.join(failures[:3])})")

    def _apply(self, reply: Any) -> None:
        slots: list[Address | None] = [None] * 16384
        known: list[Address] = []
        for start, end, master, *replicas in reply:
            address = (_host(master[0]) or "127.0.0.1", int(master[1]))
            for slot in range(int(start), int(end) + 1):
                slots[slot] = address
            known.append(address)
            known.extend((_host(r[0]) or "127.0.0.1", int(r[1])) for r in replicas)
        self._slots = slots
        self._known = list(dict.fromkeys([*known, *self.endpoint.hosts]))

    def _masters_known(self) -> list[Address]:
        return list(dict.fromkeys(a for a in self._slots if a is not None))

    def address(self, key: str) -> Address:
        address = self._slots[key_slot(key.encode())]
        if address is None:
            self.stale()
            raise BusUnavailable(f"no master of {self.endpoint.redacted} serves the slot of "
                                 f"{key!r} (cluster down or resharding)")
        return address

    def client(self, key: str) -> Any:
        return self._client_at(self.address(key))

    def masters(self) -> list[Any]:
        return [self._client_at(a) for a in self._masters_known()]


def _host(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def nodes_for(endpoint: Endpoint, *, max_connections: int) -> Nodes:
    """The :class:`Nodes` of ``endpoint``'s topology."""
    make: dict[str, Callable[..., Nodes]] = {
        "single": SingleNode, "sentinel": SentinelMaster, "cluster": ClusterMasters}
    return make[endpoint.kind](endpoint, max_connections=max_connections)
