"""A signal received is handed over, or it is returned by the next wait: never skipped.

The windows of the skipped signal (issue 11): a wait's receipt lands, so the bus records the ACK
and the wait as signaled, but ``wait_for`` never returns the signal, because the caller was
cancelled meanwhile (while the receipt was in flight, or just after it landed) or the bus went
away. The caller then waits again with ``iteration=0`` ("the next one"): before this fix that
started the next iteration, and the acknowledged signal was skipped.

And the wait that never was: ``begin_wait`` ran, but its reply was lost to a cancellation, so
the bus showed the coordinator ``waiting`` until its deadline with nobody in the wait.

Each race is timed by wrapping one store method of a real bus (a scripted delay of a narrow
interface); every effect is on the real server.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from streambus import Hooks
from streambus.bus import Bus
from streambus.coordinator import Delivery
from streambus.errors import BusUnavailable, WaitTimeout
from tests.fakes import until
from tests.helpers import until_states

pytestmark = pytest.mark.anyio


Around = Callable[[Callable[..., Awaitable[Any]], tuple[Any, ...], dict[str, Any]],
                  Awaitable[Any]]


def wrap(monkeypatch: pytest.MonkeyPatch, bus: Bus, name: str, around: Around) -> None:
    real = getattr(bus._store, name)

    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        return await around(real, args, kwargs)

    monkeypatch.setattr(bus._store, name, wrapped)


def held_on_its_way(sent: anyio.Event, release: anyio.Event) -> Around:
    """For :func:`wrap`: the call sets ``sent``, then stays on its way to the server until
    ``release`` (whatever is cancelled meanwhile), where it then runs late."""
    async def late(real: Callable[..., Awaitable[Any]], args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
        sent.set()
        with anyio.CancelScope(shield=True):
            await release.wait()
            return await real(*args, **kwargs)

    return late


async def cancelled_wait(bus: Bus, swarm: str, landed: anyio.Event, *, channel: str = "ch",
                         hooks: Hooks | None = None) -> None:
    """Run a wait and cancel it once ``landed`` is set; it must end cancelled, not return."""
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            async def cancel_when_landed() -> None:
                await landed.wait()
                scope.cancel()

            tg.start_soon(cancel_when_landed)
            await bus.coordinator(swarm, "c", hooks=hooks).wait_for(channel, timeout=30)
            pytest.fail("the wait returned although it was cancelled")


async def cancelled_in_its_hook(bus: Bus, swarm: str, channel: str = "ch") -> None:
    """A wait cancelled in its ``on_signal_received`` hook: the receipt is recorded, the
    signal not yet returned."""
    landed = anyio.Event()

    async def hook(event: object) -> None:
        landed.set()
        await anyio.sleep_forever()

    hooks = Hooks()
    hooks.add("on_signal_received", hook, timeout=30)
    await cancelled_wait(bus, swarm, landed, channel=channel, hooks=hooks)


async def next_waits_return_it_once(bus: Bus, swarm: str, signal_id: str, iteration: int
                                    ) -> Delivery:
    again = await bus.wait_for(swarm, "c", "ch", timeout=5)
    assert (again.signal.signal_id, again.iteration) == (signal_id, iteration)
    with pytest.raises(WaitTimeout):  # handed over now: the following wait is the next one
        await bus.wait_for(swarm, "c", "ch", timeout=0.3)
    return again


async def test_a_wait_cancelled_while_its_receipt_is_in_flight_returns_it_next_time(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    landed, release = anyio.Event(), anyio.Event()

    async def slow_reply(real: Callable[..., Awaitable[Any]], args: tuple[Any, ...],
                         kwargs: dict[str, Any]) -> Any:
        result = await real(*args, **kwargs)  # applied on the server: the ACK is recorded
        landed.set()
        await release.wait()  # ...and the reply is slow to come back
        return result

    wrap(monkeypatch, bus, "receive_on", slow_reply)
    published = await bus.publish("inflight", "ch", "x")
    async with anyio.create_task_group() as tg:
        tg.start_soon(cancelled_wait, bus, "inflight", landed)
        await landed.wait()
        dispatcher = bus._runtime.dispatchers.get("inflight")
        assert dispatcher is not None
        await until(lambda: dispatcher.waiters == 0)  # cancelled: withdrawn, receipt in flight
        release.set()
    monkeypatch.undo()
    [row] = await bus.status("inflight")
    assert row.state == "signaled"
    again = await next_waits_return_it_once(bus, "inflight", published.signal_id, 1)
    assert again.ack_id == await bus.ack_id("inflight", published.signal_id, "c")


async def test_a_wait_cancelled_after_its_receipt_landed_returns_it_next_time(bus: Bus) -> None:
    """Cancelled in its ``on_signal_received`` hook: the receipt is recorded, the signal not
    yet returned."""
    published = await bus.publish("hook", "ch", "x")
    await cancelled_in_its_hook(bus, "hook")
    await next_waits_return_it_once(bus, "hook", published.signal_id, 1)


async def test_a_signal_not_handed_over_while_the_bus_is_away_is_remembered(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bus cannot be told that the signal was never handed over (end_wait fails): this
    process remembers it, and its next wait asks for it."""
    async def unreachable(real: Callable[..., Awaitable[Any]], args: tuple[Any, ...],
                          kwargs: dict[str, Any]) -> Any:
        raise BusUnavailable("Redis unreachable (scripted)")

    published = await bus.publish("away", "ch", "x")
    wrap(monkeypatch, bus, "end_wait", unreachable)
    await cancelled_in_its_hook(bus, "away")
    monkeypatch.undo()
    assert (await bus.status("away"))[0].state == "signaled"
    await next_waits_return_it_once(bus, "away", published.signal_id, 1)


async def test_a_reread_by_iteration_that_fails_does_not_return_it_again(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting again by number for a signal already handed over is a re-read: when it fails
    (the bus away, or cancelled), the next "next" wait starts the next iteration; it must not
    return that signal a second time."""
    await bus.publish("again", "ch", "x")
    first = await bus.wait_for("again", "c", "ch", timeout=5)

    async def away(real: Callable[..., Awaitable[Any]], args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
        raise BusUnavailable("Redis unreachable (scripted)")

    wrap(monkeypatch, bus, "entry", away)
    with pytest.raises(BusUnavailable):
        await bus.wait_for("again", "c", "ch", timeout=5, iteration=first.iteration)
    monkeypatch.undo()
    with pytest.raises(WaitTimeout):
        await bus.wait_for("again", "c", "ch", timeout=0.3)


async def test_a_returned_again_signal_cancelled_twice_is_still_returned(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not handed over (cancelled in its hook); the next wait, which takes it over, is cancelled
    with its begin_wait reply lost; the one after still gets it."""
    published = await bus.publish("twice", "ch", "x")
    await cancelled_in_its_hook(bus, "twice")
    ran = anyio.Event()

    async def lost_reply(real: Callable[..., Awaitable[Any]], args: tuple[Any, ...],
                         kwargs: dict[str, Any]) -> Any:
        await real(*args, **kwargs)
        ran.set()
        await anyio.sleep_forever()

    wrap(monkeypatch, bus, "begin_wait", lost_reply)
    await cancelled_wait(bus, "twice", ran)
    monkeypatch.undo()
    await next_waits_return_it_once(bus, "twice", published.signal_id, 1)


async def test_a_receipt_applied_after_its_wait_ended_is_returned_next_time(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receipt reaches the server only after the cancelled wait stopped waiting for it (and
    recorded itself cancelled): nobody handed the signal over, so the next wait returns it."""
    monkeypatch.setattr("streambus.dispatch._SETTLE_LIMIT_S", 0.2)
    sent, release = anyio.Event(), anyio.Event()
    wrap(monkeypatch, bus, "receive_on", held_on_its_way(sent, release))
    published = await bus.publish("late-receipt", "ch", "x")
    async with anyio.create_task_group() as tg:
        tg.start_soon(cancelled_wait, bus, "late-receipt", sent)
        await sent.wait()
        await until_states(bus, "late-receipt", {"c": "cancelled"})
        release.set()
    await until_states(bus, "late-receipt", {"c": "signaled"})
    monkeypatch.undo()
    await next_waits_return_it_once(bus, "late-receipt", published.signal_id, 1)


async def test_a_claim_remembered_for_a_wait_that_went_on_returns_nothing_twice(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancelled wait's end could not be recorded (the process remembers it); the same
    iteration is then resumed by number and takes its signal. The remembered claim must not
    hand that signal over a second time."""
    async def away(real: Callable[..., Awaitable[Any]], args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
        raise BusUnavailable("Redis unreachable (scripted)")

    wrap(monkeypatch, bus, "end_wait", away)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            async def wait() -> None:
                await bus.wait_for("claim", "c", "ch", timeout=30)

            tg.start_soon(wait)
            await until_states(bus, "claim", {"c": "waiting"})
            scope.cancel()
    monkeypatch.undo()
    published = await bus.publish("claim", "ch", "x")
    resumed = await bus.wait_for("claim", "c", "ch", timeout=5, iteration=1)
    assert resumed.signal.signal_id == published.signal_id
    with pytest.raises(WaitTimeout):
        await bus.wait_for("claim", "c", "ch", timeout=0.3)


async def test_a_begin_wait_reply_lost_to_a_cancellation_leaves_no_open_wait(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran = anyio.Event()

    async def lost_reply(real: Callable[..., Awaitable[Any]], args: tuple[Any, ...],
                         kwargs: dict[str, Any]) -> Any:
        await real(*args, **kwargs)  # the wait is recorded on the server...
        ran.set()
        await anyio.sleep_forever()  # ...and its reply never comes

    wrap(monkeypatch, bus, "begin_wait", lost_reply)
    await cancelled_wait(bus, "lost", ran)
    [row] = await bus.status("lost")
    assert row.state == "cancelled"


async def test_a_begin_wait_that_runs_after_its_cancellation_starts_nothing(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other order: cancelled while begin_wait is on its way, which the server runs only
    after the cancellation was recorded. The token left by the cancellation stops it."""
    sent: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    held = anyio.Event()

    async def delayed(real: Callable[..., Awaitable[Any]], args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> Any:
        sent.append((args, kwargs))
        held.set()
        await anyio.sleep_forever()  # still on its way when the caller is cancelled

    await bus.publish("late", "ch", "x")  # there for the taking, if the wait were open
    real = bus._store.begin_wait
    wrap(monkeypatch, bus, "begin_wait", delayed)
    await cancelled_wait(bus, "late", held)
    monkeypatch.undo()
    [(args, kwargs)] = sent
    start = await real(*args, **kwargs)  # the server runs it now, late
    assert start.withdrawn
    assert [row.state for row in await bus.status("late")] in ([], ["cancelled"])
    delivered = await bus.wait_for("late", "c", "ch", timeout=5)  # nothing was taken
    assert delivered.iteration == 1


async def test_a_signal_not_handed_over_waits_for_the_next_wait_on_its_channel(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not handed over on ``a``; the coordinator then waits on ``b`` (the chaos soak's
    workers switch channels). The signal is parked for ``a``, and the next wait there
    returns it, once."""
    published = await bus.publish("park", "a", "x")
    await cancelled_in_its_hook(bus, "park", "a")
    with pytest.raises(WaitTimeout):
        await bus.wait_for("park", "c", "b", timeout=0.2)
    again = await bus.wait_for("park", "c", "a", timeout=5)
    assert (again.signal.signal_id, again.iteration) == (published.signal_id, 1)
    with pytest.raises(WaitTimeout):
        await bus.wait_for("park", "c", "a", timeout=0.3)


async def test_a_receipt_applied_after_a_later_wait_began_is_parked_for_its_channel(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("streambus.dispatch._SETTLE_LIMIT_S", 0.2)
    sent, release = anyio.Event(), anyio.Event()
    wrap(monkeypatch, bus, "receive_on", held_on_its_way(sent, release))
    published = await bus.publish("late-park", "a", "x")
    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(cancelled_wait, bus, "late-park", sent, channel="a"))
        await sent.wait()
        await until_states(bus, "late-park", {"c": "cancelled"})
        async def wait_on_b() -> None:
            with pytest.raises(WaitTimeout):
                await bus.wait_for("late-park", "c", "b", timeout=0.5)

        tg.start_soon(wait_on_b)
        await until_states(bus, "late-park", {"c": "waiting"})
        release.set()
    monkeypatch.undo()
    again = await bus.wait_for("late-park", "c", "a", timeout=5)
    assert (again.signal.signal_id, again.iteration) == (published.signal_id, 1)
