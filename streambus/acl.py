"""Least-privilege ACL rules for the four roles on the bus (``streambus acl ROLE``).

Each role gets exactly the commands its job sends, directly or from inside the core's Lua
scripts (a script runs with its caller's ACL, for every command it calls and every key it
touches), and only the keys of one namespace, or of one swarm of it:

* ``agent``: wait, signal, heartbeat, retry requests and their handling, ACKs.
* ``observer``: ``status``, the blocking view, the scrape-time reads of the metrics and the
  dashboard. Read-only: its keys are ``%R~`` (read permission only), its scripts run as
  ``EVALSHA_RO``, and no command of it writes data.
* ``projector``: the consumers (``streambus metrics``, ``traces``, ``watchdog``): the reads of an
  observer, plus its own consumer groups on the lifecycle and ACK streams, the dead-letter
  stream, the counters, and the watchdog's ``CoordinatorDead`` reports. It cannot write a
  channel, so it cannot forge a signal.
* ``admin``: everything above plus ``cleanup`` (deleting what stale coordinators left behind).

No role gets ``FLUSHALL``, ``CONFIG``, ``KEYS`` or any ``@dangerous`` command, save one for
agents: ``CLIENT UNBLOCK`` ends another client's blocking read early, as if it timed out (the
dispatcher interrupts its own read with it when a new waiter arrives; every streambus reader
simply reads again).

The rules never name a command one of the supported servers lacks (``CLIENT SETINFO`` and
``WAITAOF`` are unknown to Redis 7.0, and naming them makes ``ACL SETUSER`` fail): both come
with the ``@connection`` category where the server has them. redis-py's ``CLIENT SETINFO`` on
connect ignores a refusal anyway.

The same rules hold on every topology. ACLs are per node, so a user must be created (and
persisted: ``ACL SAVE`` with an ``aclfile``, or ``CONFIG REWRITE``; ``ACL SETUSER`` alone
lasts until the node restarts) on every data node: on a Redis Cluster every master *and*
replica, and every node added later; under Sentinel the master and every replica. A replica
never serves the bus until a failover makes it the master, and then it needs the users.
Sentinels are not data nodes: the bus asks them with the URL's ``sentinel_username`` /
``sentinel_password`` (none by default), never with the role's credentials. On a Cluster the
bus discovers the masters with ``CLUSTER SLOTS`` (granted); redis-py's own cluster client
also sends ``COMMAND`` (its command table, and ``COMMAND GETKEYS`` before an ``XREADGROUP``),
``READONLY`` (replica reads) and ``ASKING`` (during a resharding), which ``@connection``
grants on Redis 7.0 and Valkey alike. ``CLUSTER NODES`` and ``CLUSTER SHARDS`` are not
granted: neither client sends them. Tested on both servers in ``tests/test_acl_cluster.py``
(and failed over: a promoted replica serves every role).

Ids hold no glob characters (:mod:`streambus.keys`), so a namespace or swarm cannot widen a
key pattern.
"""

from __future__ import annotations

from typing import Final, Literal

from streambus.errors import InvalidInput
from streambus.keys import validate_id

Role = Literal["agent", "observer", "projector", "admin"]
ROLES: Final[tuple[Role, ...]] = ("agent", "observer", "projector", "admin")

_BASE: Final = ("+@connection", "-@dangerous", "+time", "+cluster|slots")
"""Every role: PING, HELLO, SELECT, CLIENT ID/SETNAME (and SETINFO, WAITAOF where the server
has them), COMMAND, READONLY, ASKING, minus the dangerous ones; the server clock; a cluster's
slot map (``CLUSTER SLOTS`` alone: the rest of ``CLUSTER`` stays refused)."""

_READ: Final = ("+scan", "+hget", "+hgetall", "+hmget", "+zrange",
                "+zrangebyscore", "+zscore", "+xlen", "+xrange", "+xrevrange", "+xread",
                "+xinfo|groups", "+xinfo|stream", "+xpending", "+evalsha_ro", "+script|load",
                "+pttl")
"""What the read side (status, views, metrics scrapes) sends, read-only scripts included."""

_SCRIPTS: Final = ("+evalsha", "+evalsha_ro", "+script|load")

_AGENT: Final = ("+get", "+set", "+hget", "+hgetall", "+hmget", "+hset", "+hdel", "+hincrby",
                 "+expire", "+zadd", "+zscore", "+zrange", "+xadd", "+xack", "+xrange",
                 "+xrevrange", "+xread", "+xreadgroup", "+xpending", "+xautoclaim",
                 "+xgroup|create", "+xgroup|delconsumer", "+multi", "+exec", "+discard")
"""publish, begin_wait, deliver, receive, end_wait, beat, last_beats, retry_request,
retry_done, progress, and the dead-letter / unknown-event bookkeeping."""

_PROJECTOR: Final = ("+xreadgroup", "+xack", "+xautoclaim", "+xgroup|create",
                     "+xgroup|destroy", "+xgroup|delconsumer", "+xadd", "+hincrby", "+hset",
                     "+multi", "+exec", "+discard")
"""Its groups (create, read, acknowledge, claim, reset for a rebuild), dead letters and
counters, and ``report_dead`` (HGET/HSET/XADD/ZRANGEBYSCORE)."""

_CLEANUP: Final = ("+del", "+zrem", "+xgroup|destroy", "+xgroup|delconsumer")

_PROJECTOR_WRITES: Final = ("events", "acks", "dead", "counters", "reported-dead", "alive")
"""The keys of a swarm a projector may write; every other key it may only read. ``alive`` only
because ``report_dead`` declares it (``EVALSHA`` wants write permission on every declared key):
no command of the role writes a sorted set, so the heartbeat index stays out of its reach."""


def acl_rules(role: str, namespace: str, swarm: str | None = None) -> str:
    """One line of ACL rules for ``role``, to follow ``ACL SETUSER <name> on ><password>``.

    Keys are those of ``namespace`` (every swarm), or of ``swarm`` alone.
    """
    if role not in ROLES:
        raise InvalidInput(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    namespace = validate_id(namespace, "namespace")
    scope = f"{namespace}:{{{validate_id(swarm, 'swarm')}}}" if swarm else f"{namespace}:{{*}}"
    keys: tuple[str, ...]
    commands: tuple[str, ...]
    if role == "observer":
        keys, commands = (f"%R~{scope}:*",), _READ
    elif role == "projector":
        keys = (f"%R~{scope}:*", *(f"~{scope}:{name}" for name in _PROJECTOR_WRITES))
        commands = (*_READ, *_SCRIPTS, *_PROJECTOR)
    elif role == "agent":
        keys, commands = (f"~{scope}:*",), (*_SCRIPTS, *_AGENT)
    else:
        keys = (f"~{scope}:*",)
        commands = (*_READ, *_SCRIPTS, *_AGENT, *_PROJECTOR, *_CLEANUP)
    unblock = ("+client|unblock",) if role in ("agent", "admin") else ()
    # The leases (one trace projector per swarm): a selector, so that GET and SET reach the
    # lease keys alone, never the streams the projector may only append to.
    leases = (f"(~{scope}:leases:* +evalsha +script|load +get +set +pttl +del)",
              ) if role == "projector" else ()
    return " ".join(["resetkeys", "resetchannels", "-@all", *keys, *_BASE,
                     *dict.fromkeys(commands), *unblock, *leases])
