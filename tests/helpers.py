"""Small helpers shared by the tests."""

from __future__ import annotations

import anyio

from streambus.bus import Bus


async def until_states(bus: Bus, swarm: str, want: dict[str, str], timeout: float = 10) -> None:
    """Wait (bounded) until the recorded blocking states include ``want``.

    Tests use it to know waiters are really blocking before they signal; it polls a real
    condition in Redis, it does not sleep in place of one.
    """
    with anyio.fail_after(timeout):
        while True:
            states = {r.coordinator: r.state for r in await bus.status(swarm)}
            if all(states.get(k) == v for k, v in want.items()):
                return
            await anyio.sleep(0.01)
