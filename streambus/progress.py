"""Progress on the bus: which items of a task are done, so a replacement can resume.

The plan's recovery scenario: a coordinator works through 50 items and dies at item 30; a
replacement detects the dead one (its heartbeats lapse), reads the progress and resumes at item
31, with no item done twice or skipped. Each item is recorded done once (an atomic script: the
first record wins, a repeat changes nothing) as a ``ProgressRecorded`` event on the task's
progress stream, in order; the record is kept 24 h after the last one.

Recording is the commit point. Work whose effect lives outside the bus should be idempotent
per item (or record first and do after, for at-most-once): a process can die between the work
and the record, and then the item is done again by the replacement.
"""

from __future__ import annotations

import logging
from typing import Any

from streambus.backoff import retry_within
from streambus.bus import Bus
from streambus.keys import validate_id
from streambus.schema import ProgressRecorded, decode_fields, encode

log = logging.getLogger(__name__)


class TaskProgress:
    """The progress of one task of a swarm, shared by whoever works on it."""

    def __init__(self, bus: Bus, swarm: str, task: str) -> None:
        self.bus = bus
        self.keys = bus.keys(swarm)
        self.task = validate_id(task, "task id")

    def __repr__(self) -> str:
        return f"<TaskProgress {self.task!r} swarm={self.keys.swarm!r}>"

    async def record(self, item: str, coordinator: str, detail: Any = None) -> bool:
        """Record ``item`` done by ``coordinator``; False if it was already recorded."""
        event = encode(ProgressRecorded(task=self.task, item=validate_id(item, "item id"),
                                        coordinator=validate_id(coordinator, "coordinator id"),
                                        detail=detail))
        store = self.bus._store  # a core module: the store is its to use
        fresh, _ = await retry_within(
            lambda: store.record_progress(self.keys, self.task, item, event),
            self.bus.publish_retry_budget_s)
        log.info("task %s: item %s done by %s%s", self.task, item, coordinator,
                 "" if fresh else " (already recorded)")
        return fresh

    async def done(self) -> list[ProgressRecorded]:
        """Every item recorded done, in the order they were recorded."""
        records: list[ProgressRecorded] = []
        start = "-"
        while True:
            entries = await self.bus.read_entries(self.keys.progress(self.task), start)
            for entry_id, fields in entries:
                event = decode_fields(fields)
                if isinstance(event, ProgressRecorded):
                    records.append(event)
                start = f"({entry_id}"
            if len(entries) < 1000:
                return records
