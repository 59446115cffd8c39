"""The reconnect budget counts a frozen server the same way as a dead one (issue 11).

A killed server refuses connections at once; a frozen one (SIGSTOP) or a cut link answers
nothing, and the failure surfaces only at the socket timeout. Either way the wait's budget
counts from the first operation that got no answer, and the wait ends with
:class:`BusUnavailable` (exit 4), not at its deadline. The link cut is in ``test_partition.py``.
"""

from __future__ import annotations

import anyio
import pytest

import streambus
from streambus.errors import BusUnavailable
from tests.helpers import until_states
from tests.servers import ServerProcess

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.mark.parametrize("fault", ["freeze", "kill"])
async def test_the_budget_ends_a_wait_on_a_frozen_or_dead_server(
    own_server: ServerProcess, namespace: str, fault: str
) -> None:
    async with streambus.connect(own_server.url, namespace=namespace, block_ms=500) as bus:
        async with anyio.create_task_group() as tg:
            outcome: list[BaseException] = []
            ended = anyio.Event()

            async def wait() -> None:
                try:
                    await bus.wait_for("budget", "c", "ch", timeout=120, reconnect_budget=1.0)
                except BusUnavailable as exc:
                    outcome.append(exc)
                finally:
                    ended.set()

            tg.start_soon(wait)
            await until_states(bus, "budget", {"c": "waiting"})
            if fault == "freeze":
                own_server.freeze()
            else:
                own_server.kill()
            with anyio.fail_after(30):  # far below the 120 s deadline
                await ended.wait()
        [error] = outcome
        assert "reconnect budget 1.0 s" in str(error)
