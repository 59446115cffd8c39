"""Where the bus is: the URL forms streambus accepts, parsed and checked before anything
connects (a malformed URL is one line and exit 64, never a traceback or a connection attempt).

* ``redis://[user:pass@]host:port[/db]``, ``rediss://...`` (TLS), ``unix:///path.sock``: one
  server, as redis-py reads them.
* ``redis+cluster://[user:pass@]host:port[,host:port...]``: seed nodes of a Redis Cluster; the
  rest of the cluster is discovered from them.
* ``redis+sentinel://[user:pass@]host:port[,host:port...]/SERVICE[/DB]``: the sentinels and
  the name of the master they monitor.
* ``rediss+cluster://`` and ``rediss+sentinel://``: the same over TLS.

Query parameters pass TLS and timeout settings through: ``ssl_ca_certs``, ``ssl_certfile``,
``ssl_keyfile``, ``ssl_cert_reqs`` (``required``, the default, or ``none``),
``ssl_check_hostname``; for Sentinel, ``sentinel_password`` and ``sentinel_username`` when the
sentinels have credentials of their own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from streambus.errors import InvalidInput

Kind = Literal["single", "cluster", "sentinel"]

_SCHEMES: Final[dict[str, tuple[Kind, bool]]] = {
    "redis": ("single", False),
    "rediss": ("single", True),
    "unix": ("single", False),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
}
_TLS_OPTIONS: Final = frozenset(
    {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname",
     "ssl_ca_path", "ssl_password"})
_OTHER_OPTIONS: Final = frozenset(
    {"sentinel_password", "sentinel_username", "socket_timeout", "socket_connect_timeout",
     "client_name", "protocol", "health_check_interval"})
_SERVICE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_FORMS: Final = ("redis://host:port[/db], rediss://..., unix:///path, "
                 "redis+cluster://host:port[,host:port...], "
                 "redis+sentinel://host:port[,host:port...]/SERVICE[/DB] (rediss+... for TLS)")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A parsed bus URL."""

    url: str
    kind: Kind
    tls: bool
    hosts: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    options: dict[str, str] = field(default_factory=dict)

    @property
    def redacted(self) -> str:
        """The URL with the password replaced: fit for logs, errors and output."""
        return redact(self.url)

    def tls_options(self) -> dict[str, object]:
        """redis-py keyword arguments for TLS (``ssl=True`` and the ``ssl_*`` options)."""
        if not self.tls:
            return {}
        out: dict[str, object] = {"ssl": True}
        for name, value in self.options.items():
            if name == "ssl_check_hostname":
                out[name] = value.lower() in ("1", "true", "yes")
            elif name in _TLS_OPTIONS:
                out[name] = value
        return out


_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``.

    A password that breaks the URL rules (an unescaped ``/``, ``?``, ``#`` or ``@`` in it, or a
    user name that does) still never shows: everything up to the *last* ``@`` is taken for the
    credentials, hiding too much (an ``@`` in a query option) rather than too little. Without
    ``://`` after a plain scheme nothing can be told apart, so everything up to the last ``@``
    goes.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or _SCHEME.fullmatch(scheme) is None:  # no scheme to tell the parts apart by
        _, at, tail = url.rpartition("@")
        return f"***@{tail}" if at else url
    userinfo, at, hostpart = rest.rpartition("@")
    if not at:
        return url
    user = userinfo.partition(":")[0] if ":" in userinfo else ""
    return f"{scheme}://{user}:***@{hostpart}"


def parse_url(url: str) -> Endpoint:
    """Parse and check a bus URL; raise :class:`InvalidInput` (one line, no password) if it is
    malformed."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise _invalid(url, f"unknown scheme {scheme + sep!r}" if sep and _SCHEME.fullmatch(
            scheme) else "no scheme (such as redis://) starts it")
    kind, tls = _SCHEMES[scheme.lower()]
    if scheme.lower() == "unix":
        return Endpoint(url, kind, tls)
    try:
        split = urlsplit(url)
    except ValueError as exc:  # e.g. an unbalanced '[' (IPv6 brackets)
        raise _invalid(url, str(exc)) from None
    userinfo, at, hostlist = split.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    hosts = tuple(_host(url, part) for part in hostlist.split(",")) if hostlist else ()
    if not hosts:
        raise _invalid(url, "no host:port")
    # One server's URL goes to redis-py's own from_url, which knows every option it takes.
    options = _options(url, split.query, strict=kind != "single")
    path = [p for p in split.path.split("/") if p]
    if kind == "sentinel":
        if not path:
            raise _invalid(url, "no service name (redis+sentinel://host:port/SERVICE)")
        if _SERVICE.fullmatch(path[0]) is None:
            raise _invalid(url, f"invalid service name {path[0]!r}")
        db = _db(url, path[1:])
        return Endpoint(url, kind, tls, hosts, path[0], db, username, password, options)
    if kind == "cluster" and path and path != ["0"]:
        raise _invalid(url, "a cluster has only database 0")
    if kind == "single" and len(hosts) > 1:
        raise _invalid(url, "several hosts: use redis+cluster:// or redis+sentinel://")
    return Endpoint(url, kind, tls, hosts, "", _db(url, path), username, password, options)


def _host(url: str, part: str) -> tuple[str, int]:
    host, colon, port = part.strip().rpartition(":")
    if not colon:
        host, port = part.strip(), "6379"
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _invalid(url, f"invalid host:port {part!r}")
    return host, int(port)


def _db(url: str, rest: list[str]) -> int:
    if not rest:
        return 0
    if len(rest) > 1 or not rest[0].isdigit():
        raise _invalid(url, f"invalid database {'/'.join(rest)!r}")
    return int(rest[0])


def _options(url: str, query: str, *, strict: bool) -> dict[str, str]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise _invalid(url, "malformed query string") from None
    options = dict(pairs)
    unknown = sorted(set(options) - _TLS_OPTIONS - _OTHER_OPTIONS)
    if unknown and strict:
        raise _invalid(url, f"unknown option {unknown[0]!r}")
    return options


def _invalid(url: str, why: str) -> InvalidInput:
    # ``why`` quotes a piece of the URL, which in a malformed URL may hold the password: where
    # the user name itself breaks the URL rules, the password may start after any ':' of the
    # credentials, and a quoted piece shows it escaped (repr), so every form goes.
    scheme, sep, rest = url.partition("://")
    userinfo = (rest if sep and _SCHEME.fullmatch(scheme) else url).rpartition("@")[0]
    secrets = {userinfo, *(userinfo[i + 1:] for i, c in enumerate(userinfo) if c == ":")}
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        escaped = repr(secret)[1:-1]
        for form in (secret, escaped, escaped.replace("'", "\\'"),
                     secret.encode("unicode_escape").decode("ascii")):
            why = why.replace(form, "***")
    return InvalidInput(f"invalid Redis URL {redact(url)!r}: {why}; expected {_FORMS}")
