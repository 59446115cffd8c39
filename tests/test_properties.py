"""Property-based tests (hypothesis): whatever a caller passes, streambus answers with success or
one clear error, never a traceback; whatever bytes land in a stream the bus reads, no consumer
crashes, the poison goes to the dead-letter stream, and genuine entries still arrive."""

from __future__ import annotations

import contextlib
import io
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import anyio
import msgspec
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streambus
from consumers.metrics import SwarmEvents
from streambus.cli import main
from streambus.config import parse_duration
from streambus.errors import InvalidInput
from streambus.keys import SwarmKeys, validate_id
from streambus.signing import Keyring, SigningKey
from streambus.store.urls import parse_url, redact

T = TypeVar("T")
FAST = settings(max_examples=200, deadline=None)
SLOW = settings(max_examples=25, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
text = st.text(st.characters(codec="utf-8"), max_size=80)
SECRET = "Zq7-SECRET-x9"


def attempt(call: Callable[[], T]) -> tuple[T | None, str]:
    """``(result, "")``, or ``(None, message)`` when the call raises InvalidInput."""
    try:
        return call(), ""
    except InvalidInput as exc:
        return None, str(exc)


@FAST
@given(text)
def test_ids_are_valid_or_invalid_id(value: str) -> None:
    valid, error = attempt(lambda: validate_id(value))
    if error:
        assert "\n" not in error.replace(repr(value), "")
        return
    assert valid == value
    keys = SwarmKeys.for_swarm("ns", value)
    assert keys.channel(value).count("{") == 1  # an id never moves the hash slot


@FAST
@given(text)
def test_durations_parse_or_are_invalid_input(value: str) -> None:
    seconds, error = attempt(lambda: parse_duration(value))
    assert error or (seconds is not None and seconds >= 0)


@FAST
@given(st.sampled_from(["redis", "rediss", "redis+cluster", "rediss+sentinel", "unix", "http",
                        ""]), st.sampled_from(["://", ":/", ":", ""]), text, text, text)
def test_urls_parse_or_are_invalid_input_without_the_password(
        scheme: str, separator: str, user: str, host: str, rest: str) -> None:
    """(Found leaking, before the fix: a user name holding "/" and ":", an "@" before the first
    "/", a "://" after the password, and a URL with no "://" at all.)"""
    url = f"{scheme}{separator}{user}:{SECRET}@{host}{rest}"
    endpoint, error = attempt(lambda: parse_url(url))
    assert SECRET not in error
    assert SECRET not in redact(url)
    assert endpoint is None or SECRET not in endpoint.redacted


@pytest.mark.parametrize("url", [
    "redis://0/:\x1f:Zq7-SECRET-x9@", "redis://@/:Zq7-SECRET-x9@", "unix://@/:Zq7-SECRET-x9@",
    "redis:/:Zq7-SECRET-x9@://0", "redis:user:Zq7-SECRET-x9@host"])
def test_urls_that_leaked_their_password_once(url: str) -> None:
    endpoint, error = attempt(lambda: parse_url(url))
    assert SECRET not in error
    assert SECRET not in redact(url)
    assert endpoint is None or SECRET not in endpoint.redacted


@FAST
@given(st.sampled_from(["agent", "observer", "projector", "admin", "root", ""]), text, text)
def test_cli_acl_prints_rules_or_one_line_of_error(role: str, namespace: str, swarm: str
                                                   ) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["acl", role, "--namespace", namespace, "--swarm", swarm])
    assert code in (0, 64), err.getvalue()
    if code == 0:
        assert out.getvalue().count("\n") == 1
        rules = out.getvalue().split()
        assert not {"~*", "%R~*", "allkeys", "+@all"} & set(rules)  # never every key or command
    else:
        assert "Traceback" not in err.getvalue()
        assert err.getvalue().strip().count("\n") == 0


@FAST
@given(st.lists(text, min_size=1, max_size=6))
def test_cli_rejects_bad_arguments_with_one_line(words: list[str]) -> None:
    """Arbitrary words after a command, against a malformed URL: nothing connects, and the
    answer is one line with exit 64 (usage) whatever the words are."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["wait", *words, "--redis-url", f"nope://u:{SECRET}@h"])
    assert code == 64
    assert "Traceback" not in err.getvalue()
    assert err.getvalue().strip().count("\n") == 0
    assert SECRET not in err.getvalue()


@FAST
@given(text.filter(lambda t: "K3Y" not in t), text)
def test_signing_keys_parse_or_are_invalid_input(key_id: str, tail: str) -> None:
    secret = "K3Y" + tail
    key, error = attempt(lambda: SigningKey.parse(f"{key_id}:{secret}", "test"))
    assert "K3Y" not in error
    assert key is None or "K3Y" not in repr(Keyring((key,)))


fields = st.dictionaries(st.binary(max_size=8) | st.sampled_from([b"e", b"type"]),
                         st.binary(max_size=64) | st.sampled_from(
                             [b"{}", b'{"type":"signal"}', b"null", b"[]", b'"x"',
                              b'{"type":"ack","v":"1"}']),
                         min_size=1, max_size=4)


@pytest.fixture(scope="module")
def server_url(redis_url: str) -> str:
    return redis_url


@SLOW
@given(st.lists(fields, min_size=1, max_size=3))
def test_poison_on_a_channel_never_stops_a_wait(server_url: str,
                                                poison: list[dict[bytes, bytes]]) -> None:
    async def run() -> None:
        namespace = f"p{uuid.uuid4().hex[:10]}"
        async with streambus.connect(server_url, namespace=namespace) as bus:
            raw = aioredis.Redis.from_url(server_url)
            try:
                for entry in poison:
                    await raw.xadd(bus.keys("sw").channel("go"), entry)  # type: ignore[arg-type]
            finally:
                await raw.aclose()
            await bus.publish("sw", "go", "genuine", signal_id="genuine")
            with anyio.fail_after(10):
                delivery = await bus.wait_for("sw", "c1", "go", timeout=5)
            assert delivery.signal.signal_id == "genuine"
            counters = await bus.counters("sw")
            assert counters.get("dead_letters", 0) + counters.get("unknown_events", 0) == len(
                poison)

    anyio.run(run)


@contextlib.asynccontextmanager
async def signing_bus(server_url: str) -> AsyncIterator[tuple[streambus.Bus, aioredis.Redis]]:
    """A bus with a signing key on a namespace of its own, and a raw client that writes what
    no bus would."""
    signing = Keyring((SigningKey("k1", b"0123456789abcdef"),))
    async with streambus.connect(server_url, namespace=f"p{uuid.uuid4().hex[:10]}",
                                 signing=signing) as bus:
        raw = aioredis.Redis.from_url(server_url)
        try:
            yield bus, raw
        finally:
            await raw.aclose()


@SLOW
@given(st.lists(fields, min_size=1, max_size=3))
def test_poison_in_the_lifecycle_and_ack_streams_never_stops_a_projector(
        server_url: str, poison: list[dict[bytes, bytes]]) -> None:
    async def run() -> None:
        async with signing_bus(server_url) as (bus, raw):
            keys = bus.keys("sw")
            for n, entry in enumerate(poison):
                stream = keys.events if n % 2 else keys.acks
                await raw.xadd(stream, entry)  # type: ignore[arg-type]
            await bus.publish("sw", "go", None, signal_id="real")
            await bus.wait_for("sw", "c1", "go", timeout=5, require_signed=True)
            projection = SwarmEvents("sw")
            with anyio.fail_after(10):
                await bus.projector("sw", projection).catch_up()
            counters = await bus.counters("sw")
            assert counters.get("dead_letters", 0) + counters.get("unknown_events", 0) == len(
                poison)

    anyio.run(run)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | text,
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(text, inner, max_size=3), max_leaves=6)
signed_looking = st.fixed_dictionaries({
    "key_id": st.sampled_from(["k1", "k2", ""]) | text,
    "sig": st.sampled_from(["", "0" * 64]) | text,
    "sender": text,
    "payload": json_values,
})


@SLOW
@given(st.lists(signed_looking, min_size=1, max_size=3),
       st.lists(text.filter(bool), min_size=1, max_size=3))
def test_forged_signals_and_acks_never_stop_a_verifying_wait_or_sender(
        server_url: str, forged: list[dict[str, object]], ack_ids: list[str]) -> None:
    """Signals and ACKs that look signed (any key id, signature, sender and payload) on the
    channel a require-signed waiter reads, and any ACK ids recorded for the coordinators a
    require-signed sender awaits: each forgery is dead-lettered, the genuine signal and ACK
    still count."""
    async def run() -> None:
        async with signing_bus(server_url) as (bus, raw):
            keys = bus.keys("sw")
            for n, fields in enumerate(forged):
                await raw.xadd(keys.channel("go"), {b"e": msgspec.json.encode({
                    "type": "signal", "v": 1, "signal_id": f"forged-{n}", "swarm": "sw",
                    "channel": "go", **fields})})
            await raw.hset(keys.acked("real"),  # type: ignore[misc]
                           mapping={f"x{n}": ack_id for n, ack_id in enumerate(ack_ids)})
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: bus.wait_for("sw", "c1", "go", timeout=10,
                                                   require_signed=True))
                with anyio.fail_after(10):
                    await bus.publish("sw", "go", "genuine", signal_id="real", await_acks=["c1"],
                                      require_signed=True)
            with pytest.raises(streambus.AckTimeout) as caught:
                await bus.wait_for_acks("sw", "real", [f"x{n}" for n in range(len(ack_ids))],
                                        timeout=0.2, require_signed=True)
            assert set(caught.value.rejected) == {f"x{n}" for n in range(len(ack_ids))}
            counters = await bus.counters("sw")
            assert counters.get("dead_letters", 0) == len(forged) + len(ack_ids)

    anyio.run(run)
