"""The CFN Loop as a state machine driven by events on the bus.

An epic (Loop 0, one per swarm) is an ordered list of phases (Loop 1). Each phase moves through

    pending -> implementing (Loop 3, iteration n) -> validating (Loop 2, round r)
            -> implementing (iteration n+1: a retry round) ... -> deciding (Loop 4)
            -> done (PROCEED / DEFER)  |  escalated (ESCALATE, or a limit reached)

Every transition is a ``LoopTransition`` event on the swarm's ``loop`` stream, appended by a
compare-and-set script: a phase moves only from the state its writer saw, so two processes can
never both move it. A phase may start implementing only once the phase before it is ``done``
(the plan's scenario 2). The current state is cached in a hash, and :meth:`EpicLoop.rebuild`
recomputes it from the stream alone, after every process has died.

Illegal transitions raise :class:`IllegalTransition` and write nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from streambus.bus import Bus
from streambus.cfn.events import EpicStarted, LoopTransition, decode_fields
from streambus.cfn.keys import LoopKeys
from streambus.errors import InvalidInput, StreambusError
from streambus.keys import validate_id
from streambus.schema import FIELD, encode
from streambus.store import Script

_EPIC_FIELD: Final = "*epic"
_TRANSITION: Final = Script.from_file(Path(__file__).parent / "lua" / "loop_transition.lua")
LOOP_TTL_S: Final = 7 * 24 * 3600
"""How long an epic's loop history and state are kept after its last transition."""


class IllegalTransition(StreambusError):
    """A loop transition the state machine does not allow. Nothing was written."""


class PhaseState(enum.StrEnum):
    PENDING = "pending"
    IMPLEMENTING = "implementing"
    VALIDATING = "validating"
    DECIDING = "deciding"
    DONE = "done"
    ESCALATED = "escalated"


ALLOWED: Final[dict[PhaseState, frozenset[PhaseState]]] = {
    PhaseState.PENDING: frozenset({PhaseState.IMPLEMENTING}),
    PhaseState.IMPLEMENTING: frozenset({PhaseState.VALIDATING, PhaseState.ESCALATED}),
    PhaseState.VALIDATING: frozenset(
        {PhaseState.IMPLEMENTING, PhaseState.DECIDING, PhaseState.ESCALATED}),
    PhaseState.DECIDING: frozenset({PhaseState.DONE, PhaseState.ESCALATED}),
    PhaseState.DONE: frozenset(),
    PhaseState.ESCALATED: frozenset(),
}
"""Which state may follow which. Loop numbers: implementing 3, validating 2, deciding 4."""

LOOP_OF: Final = {PhaseState.IMPLEMENTING: 3, PhaseState.VALIDATING: 2, PhaseState.DECIDING: 4}


@dataclass(frozen=True)
class PhaseView:
    """One phase's current loop state."""

    phase: str
    state: PhaseState = PhaseState.PENDING
    iteration: int = 0
    round: int = 0

    @property
    def loop(self) -> int | None:
        return LOOP_OF.get(self.state)

    def encoded(self) -> str:
        return f"{self.state}|{self.iteration}|{self.round}"

    @classmethod
    def decoded(cls, phase: str, raw: str) -> PhaseView:
        state, iteration, rnd = raw.split("|")
        return cls(phase, PhaseState(state), int(iteration), int(rnd))


@dataclass(frozen=True)
class EpicView:
    """An epic's phases and their states, in order."""

    epic: str
    phases: list[PhaseView] = field(default_factory=list)

    def phase(self, name: str) -> PhaseView:
        for view in self.phases:
            if view.phase == name:
                return view
        raise InvalidInput(f"epic {self.epic!r} has no phase {name!r}")

    @property
    def current(self) -> PhaseView | None:
        """The first phase not yet done (``None`` when every phase is done)."""
        return next((p for p in self.phases if p.state != PhaseState.DONE), None)


def next_view(epic: EpicView, phase: str, to: PhaseState) -> PhaseView:
    """The phase's view after moving it ``to``; raises :class:`IllegalTransition`."""
    view = epic.phase(phase)
    if to not in ALLOWED[view.state]:
        raise IllegalTransition(
            f"phase {phase!r} of epic {epic.epic!r} cannot go from {view.state} to {to}")
    index = epic.phases.index(view)
    if view.state == PhaseState.PENDING and index > 0:
        before = epic.phases[index - 1]
        if before.state != PhaseState.DONE:
            raise IllegalTransition(
                f"phase {phase!r} cannot start: phase {before.phase!r} is {before.state}, "
                "not done")
    if to == PhaseState.IMPLEMENTING:
        return replace(view, state=to, iteration=view.iteration + 1)
    if to == PhaseState.VALIDATING:
        return replace(view, state=to, round=view.round + 1)
    return replace(view, state=to)


def replay(events: list[Any]) -> EpicView | None:
    """The epic's state from its events alone (``EpicStarted``, then ``LoopTransition``s)."""
    epic: EpicView | None = None
    for event in events:
        if isinstance(event, EpicStarted) and epic is None:
            epic = EpicView(event.epic, [PhaseView(p) for p in event.phases])
        elif isinstance(event, LoopTransition) and epic is not None:
            moved = next_view(epic, event.phase, PhaseState(event.to_state))
            epic = replace(epic, phases=[moved if p.phase == moved.phase else p
                                         for p in epic.phases])
    return epic


class EpicLoop:
    """The CFN Loop state of one epic (the swarm), read and moved through the bus."""

    def __init__(self, bus: Bus, epic: str) -> None:
        self.bus = bus
        self.epic = validate_id(epic, "epic id")
        self.keys = LoopKeys(bus.keys(epic))

    def __repr__(self) -> str:
        return f"<EpicLoop {self.epic!r}>"

    async def start(self, phases: list[str]) -> EpicView:
        """Begin the epic with its phases in order (idempotent for the same phases)."""
        if not phases or len(set(phases)) != len(phases):
            raise InvalidInput("an epic needs one or more distinct phases")
        for phase in phases:
            validate_id(phase, "phase id")
        raw = ",".join(phases)
        event = encode(EpicStarted(epic=self.epic, phases=phases))
        done, current = await self._compare_and_set(_EPIC_FIELD, "", raw, event)
        if not done and current != raw:
            raise IllegalTransition(f"epic {self.epic!r} already started with phases {current}")
        return await self.state()

    async def transition(self, phase: str, to: PhaseState | str, *, reason: str = "",
                         detail: Any = None) -> PhaseView:
        """Move ``phase`` to ``to`` if the state machine allows it; return its new view."""
        target = PhaseState(to)
        epic = await self.state()
        view = epic.phase(phase)
        moved = next_view(epic, phase, target)
        event = encode(LoopTransition(
            epic=self.epic, phase=phase, from_state=view.state, to_state=target,
            iteration=moved.iteration, round=moved.round, reason=reason, detail=detail))
        expected = "" if view.state == PhaseState.PENDING and view.iteration == 0 else (
            view.encoded())
        done, current = await self._compare_and_set(phase, expected, moved.encoded(), event)
        if not done:
            raise IllegalTransition(
                f"phase {phase!r} moved meanwhile (now {current or 'pending'}); "
                f"{view.state} -> {target} not applied")
        return moved

    async def _compare_and_set(self, field: str, expected: str, new: str, event: bytes
                               ) -> tuple[bool, str]:
        """Move one loop state and append its event, atomically: ``(done, id or current)``."""
        done, value = await self.bus.run_script(
            self.epic, _TRANSITION, [self.keys.loop_events, self.keys.loop_state],
            [field, expected, new, event, FIELD, LOOP_TTL_S])
        return bool(done), value.decode()

    async def state(self) -> EpicView:
        """The current state, from the state hash (fast)."""
        raw = await self.bus.read_hash(self.keys.loop_state)
        phases = raw.get(_EPIC_FIELD)
        if phases is None:
            raise InvalidInput(f"epic {self.epic!r} has not started")
        return EpicView(self.epic, [
            PhaseView.decoded(p, raw[p]) if p in raw else PhaseView(p)
            for p in phases.split(",")])

    async def rebuild(self) -> EpicView:
        """The current state recomputed from the loop stream alone."""
        events: list[Any] = []
        start = "-"
        while True:
            entries = await self.bus.read_entries(self.keys.loop_events, start)
            events.extend(decode_fields(fields) for _, fields in entries)
            if len(entries) < 1000:
                break
            start = f"({entries[-1][0]}"
        epic = replay(events)
        if epic is None:
            raise InvalidInput(f"epic {self.epic!r} has no history on the bus")
        return epic

    async def history(self) -> list[LoopTransition]:
        """Every transition of the epic, in order."""
        entries = await self.bus.read_entries(self.keys.loop_events, "-", count=100_000)
        return [e for _, f in entries if isinstance(e := decode_fields(f), LoopTransition)]


def as_dict(epic: EpicView) -> dict[str, Any]:
    """A JSON-friendly form of an epic's state."""
    return {
        "epic": epic.epic,
        "phases": [{"phase": p.phase, "state": str(p.state), "loop": p.loop,
                    "iteration": p.iteration, "round": p.round} for p in epic.phases],
    }
