"""The CFN Loop's keys, built on the swarm's (same hash tag, so one Cluster slot)."""

from __future__ import annotations

from dataclasses import dataclass

from streambus.keys import SwarmKeys


@dataclass(frozen=True, slots=True)
class LoopKeys:
    """The keys of one epic's loop: the epic is a swarm of the bus."""

    swarm: SwarmKeys

    @property
    def loop_events(self) -> str:
        """Stream of EpicStarted and LoopTransition events: the CFN Loop's history."""
        return f"{self.swarm.prefix}:loop"

    @property
    def loop_state(self) -> str:
        """Hash phase -> current loop state (a cache of replaying ``loop_events``)."""
        return f"{self.swarm.prefix}:loop-state"
