"""Every Redis key streambus uses is built here, from validated ids, and nowhere else.

All keys of one swarm share the hash tag ``{<swarm>}`` so that scripts and multi-stream reads
touching them stay in one Redis Cluster slot. Ids are restricted to letters, digits, ``.``,
``_`` and ``-`` (1-64 characters, starting with a letter or digit): no ``{``/``}`` that would
move the slot, no glob characters that would leak into ``SCAN MATCH`` or ACL patterns, no ``:``
that would make two different keys collide.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from streambus.errors import InvalidId

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a valid id, else raise :class:`InvalidId` naming ``what``."""
    if not isinstance(value, str) or _ID.fullmatch(value) is None:
        raise InvalidId(
            f"invalid {what} {value!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def swarm_index_pattern(namespace: str) -> str:
    """``SCAN MATCH`` pattern (with ``TYPE zset``) for every swarm's indexes in ``namespace``:
    its coordinator index and its heartbeat index (a swarm that only beats is a swarm too)."""
    return f"{validate_id(namespace, 'namespace')}:{{*}}:*"


ACKED_EXPIRY_MARK = ":expires"
"""A field of each acked hash, not a coordinator (no id starts with ``:``): the hash's first
writer set its expiry (the ``receive`` script reads the mark instead of setting it again)."""

SWARM_INDEXES = (":coordinators", ":alive")
"""The suffixes of the zsets that make a swarm: see :func:`swarm_index_pattern`."""


def swarm_channel_pattern(namespace: str) -> str:
    """``SCAN MATCH`` pattern for every channel stream of every swarm in ``namespace``."""
    return f"{validate_id(namespace, 'namespace')}:{{*}}:ch:*"


def swarm_of_key(namespace: str, key: str) -> str | None:
    """The swarm of any key of ``namespace`` (``None`` if the key is not one of ours)."""
    head = f"{namespace}:{{"
    if not key.startswith(head):
        return None
    swarm, closing, _ = key[len(head):].partition("}:")
    if not closing:
        return None
    try:
        return validate_id(swarm, "swarm")
    except InvalidId:
        return None


@dataclass(frozen=True, slots=True)
class SwarmKeys:
    """The keys of one swarm in one namespace. Build with :meth:`for_swarm`."""

    namespace: str
    swarm: str

    @classmethod
    def for_swarm(cls, namespace: str, swarm: str) -> SwarmKeys:
        return cls(validate_id(namespace, "namespace"), validate_id(swarm, "swarm"))

    @property
    def prefix(self) -> str:
        return f"{self.namespace}:{{{self.swarm}}}"

    def channel(self, channel: str) -> str:
        """Stream of signals on one channel; every waiter reads it through its own group."""
        return f"{self.prefix}:ch:{validate_id(channel, 'channel')}"

    @property
    def channel_pattern(self) -> str:
        """``SCAN MATCH`` pattern for every channel stream of the swarm (ids hold no globs)."""
        return f"{self.prefix}:ch:*"

    @property
    def acks(self) -> str:
        """Stream of Ack events of the whole swarm (senders block on it for ACKs)."""
        return f"{self.prefix}:acks"

    def acked(self, signal_id: str) -> str:
        """Hash coordinator -> ack stream id for one signal: who acknowledged it (and the field
        :data:`ACKED_EXPIRY_MARK`, which is no coordinator)."""
        return f"{self.prefix}:acked:{validate_id(signal_id, 'signal id')}"

    def dedupe(self, signal_id: str) -> str:
        """String holding the stream id a signal id was published as (24 h idempotency)."""
        return f"{self.prefix}:dedupe:{validate_id(signal_id, 'signal id')}"

    @property
    def events(self) -> str:
        """Stream of blocking lifecycle events (started, signal received, ended)."""
        return f"{self.prefix}:events"

    def state(self, coordinator: str) -> str:
        """Hash with one coordinator's blocking state."""
        return f"{self.prefix}:state:{validate_id(coordinator, 'coordinator id')}"

    def withdrawn(self, coordinator: str) -> str:
        """String: the token of a wait cancelled before its begin_wait ran (so it never will)."""
        return f"{self.prefix}:withdrawn:{validate_id(coordinator, 'coordinator id')}"

    @property
    def coordinators(self) -> str:
        """Sorted set of coordinator ids scored by their last state change (server ms)."""
        return f"{self.prefix}:coordinators"

    @property
    def dead_letters(self) -> str:
        """Stream of poison entries moved aside, with the reason and their original fields."""
        return f"{self.prefix}:dead"

    @property
    def counters(self) -> str:
        """Hash of swarm-wide counters (dead letters, duplicates)."""
        return f"{self.prefix}:counters"

    @property
    def heartbeats(self) -> str:
        """Stream of Heartbeat events, trimmed by age."""
        return f"{self.prefix}:hb"

    @property
    def alive(self) -> str:
        """Sorted set of coordinator ids scored by their last heartbeat (server ms)."""
        return f"{self.prefix}:alive"

    @property
    def reported_dead(self) -> str:
        """Hash coordinator -> last beat (ms) already reported dead by a watchdog."""
        return f"{self.prefix}:reported-dead"

    def retries(self, coordinator: str) -> str:
        """Stream of RetryRequest events for one coordinator (group: the coordinator id)."""
        return f"{self.prefix}:retry:{validate_id(coordinator, 'coordinator id')}"

    @property
    def leases(self) -> str:
        """Prefix of the swarm's leases (``leases:<job>``): one holder per job at a time."""
        return f"{self.prefix}:leases"

    def lease(self, job: str) -> str:
        return f"{self.leases}:{job}"

    @property
    def retry_backlog(self) -> str:
        """Hash coordinator -> retry requests appended and not yet processed."""
        return f"{self.prefix}:retry-backlog"

    def retry_dedupe(self, request_id: str) -> str:
        """String marking a retry request id as appended (24 h idempotency)."""
        return f"{self.prefix}:retry-dedupe:{validate_id(request_id, 'request id')}"

    def progress(self, task: str) -> str:
        """Stream of ProgressRecorded events of one task (work items done, in order)."""
        return f"{self.prefix}:progress:{validate_id(task, 'task id')}"

    def progress_done(self, task: str) -> str:
        """Hash item id -> progress entry id: which items of a task are done."""
        return f"{self.prefix}:progress-done:{validate_id(task, 'task id')}"
