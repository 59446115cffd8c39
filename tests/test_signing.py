"""Signed signals and ACKs on real servers: a ``require_signed`` wait delivers only signals signed
with a key of its keyring for its swarm and channel; unsigned, forged, altered, replayed-elsewhere
and unknown-key signals go to the dead-letter stream with their reason, wake nobody, are counted,
and a timeout names them. A coordinator holding the key signs its ACKs, and a sender that
requires signed ACKs counts no other (they are dead-lettered and named in its timeout)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import msgspec
import pytest
import redis.asyncio as aioredis

import streambus
from streambus.bus import Bus
from streambus.errors import AckTimeout, InvalidInput, WaitTimeout
from streambus.schema import Ack, decode
from streambus.signing import Keyring, SigningKey
from tests.clitools import Cli, finish, one_json_object, one_line_message

pytestmark = pytest.mark.anyio

KEY = SigningKey("k1", b"first-secret-0123456789")
NEW_KEY = SigningKey("k2", b"second-secret-0123456789")
IMPOSTOR = SigningKey("k1", b"not-the-real-secret-0123")


@pytest.fixture
async def signer(redis_url: str, namespace: str) -> AsyncIterator[Bus]:
    async with streambus.connect(redis_url, namespace=namespace,
                                 signing=Keyring((KEY,))) as connected:
        yield connected


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def dead_letters(raw: aioredis.Redis, bus: Bus, swarm: str) -> list[str]:
    return [fields[b"reason"].decode()
            for _, fields in await raw.xrange(bus.keys(swarm).dead_letters)]


async def test_signed_signal_is_delivered(signer: Bus) -> None:
    await signer.publish("sw", "go", {"verdict": "PASS"}, sender="validator-1", signal_id="s1")
    delivery = await signer.wait_for("sw", "c1", "go", timeout=5, require_signed=True)
    assert delivery.signal.payload == {"verdict": "PASS"}
    assert delivery.signal.key_id == "k1"


async def test_unsigned_and_forged_signals_wake_nobody_and_are_dead_lettered(
        signer: Bus, bus: Bus, raw: aioredis.Redis, redis_url: str, namespace: str) -> None:
    await bus.publish("sw", "go", "unsigned", sender="intruder", signal_id="u1")
    async with streambus.connect(redis_url, namespace=namespace,
                                 signing=Keyring((IMPOSTOR,))) as forger:
        await forger.publish("sw", "go", "forged", sender="validator-1", signal_id="f1")
    async with streambus.connect(redis_url, namespace=namespace,
                                 signing=Keyring((NEW_KEY,))) as stranger:
        await stranger.publish("sw", "go", "unknown key", signal_id="k9")
    await signer.publish("sw", "go", "genuine", sender="validator-1", signal_id="g1")
    delivery = await signer.wait_for("sw", "c1", "go", timeout=5, require_signed=True)
    assert delivery.signal.signal_id == "g1"
    reasons = await dead_letters(raw, signer, "sw")
    assert reasons == [
        "unsigned signal 'u1' from 'intruder'",
        "signal 'f1' from 'validator-1' has a bad signature (forged, altered, or signed for "
        "another channel)",
        "signal 'k9' signed with unknown key 'k2'",
    ]
    assert (await signer.counters("sw"))["dead_letters"] == 3


async def test_a_timeout_names_what_was_refused(signer: Bus, bus: Bus) -> None:
    await bus.publish("sw", "late", None, sender="no-key", signal_id="nk1")
    with pytest.raises(WaitTimeout) as caught:
        await signer.wait_for("sw", "c1", "late", timeout=0.5, require_signed=True)
    assert "1 signal(s) refused" in str(caught.value)
    assert "unsigned signal 'nk1' from 'no-key'" in str(caught.value)
    assert caught.value.rejected == ("unsigned signal 'nk1' from 'no-key'",)


async def test_altered_or_replayed_signals_do_not_verify(signer: Bus, raw: aioredis.Redis
                                                         ) -> None:
    await signer.publish("sw", "a", {"verdict": "FAIL"}, signal_id="orig")
    keys = signer.keys("sw")
    [(_, fields)] = await raw.xrange(keys.channel("a"))
    event = msgspec.json.decode(fields[b"e"])
    await raw.xadd(keys.channel("b"), {b"e": fields[b"e"]})  # replayed on another channel
    await raw.xadd(keys.channel("b"), {b"e": msgspec.json.encode(
        {**event, "payload": {"verdict": "PASS"}})})  # altered payload
    await raw.xadd(keys.channel("b"), {b"e": msgspec.json.encode(
        {**event, "sig": "\u00e9" * 64})})  # not hex, not even ASCII
    with pytest.raises(WaitTimeout):
        await signer.wait_for("sw", "c1", "b", timeout=0.5, require_signed=True)
    assert len(await dead_letters(raw, signer, "sw")) == 3


async def test_rotation_accepts_old_and_new_keys(redis_url: str, namespace: str) -> None:
    async with streambus.connect(redis_url, namespace=namespace,
                                 signing=Keyring((KEY,))) as old:
        await old.publish("sw", "rot", 1, signal_id="by-old")
    rotated = Keyring((NEW_KEY, KEY))
    async with streambus.connect(redis_url, namespace=namespace, signing=rotated) as new:
        first = await new.wait_for("sw", "c1", "rot", timeout=5, require_signed=True)
        await new.publish("sw", "rot", 2, signal_id="by-new")
        second = await new.wait_for("sw", "c1", "rot", timeout=5, require_signed=True)
    assert (first.signal.signal_id, second.signal.key_id) == ("by-old", "k2")


async def test_a_swarm_key_signs_nothing_in_another_swarm(signer: Bus, raw: aioredis.Redis
                                                          ) -> None:
    await signer.publish("one", "go", None, signal_id="x1")
    [(_, fields)] = await raw.xrange(signer.keys("one").channel("go"))
    await raw.xadd(signer.keys("two").channel("go"), {b"e": fields[b"e"]})
    with anyio.fail_after(5), pytest.raises(WaitTimeout):
        await signer.wait_for("two", "c1", "go", timeout=0.3, require_signed=True)


async def test_require_signed_without_a_key_is_invalid_input(bus: Bus) -> None:
    with pytest.raises(InvalidInput, match="needs a signing key"):
        await bus.wait_for("sw", "c1", "go", timeout=1, require_signed=True)


def test_keys_are_checked() -> None:
    with pytest.raises(InvalidInput, match="ID:SECRET"):
        SigningKey.parse("no-id-here-but-long-enough", "test")
    with pytest.raises(InvalidInput, match="shorter than 16 bytes"):
        SigningKey.parse("k1:short", "test")
    assert "secret" not in repr(Keyring((KEY,)))


# -- signed ACKs ----------------------------------------------------------------------------------

async def publish_awaiting(sender: Bus, waiter: Bus, coordinator: str, *, signal_id: str,
                           ack_timeout: float = 5.0) -> streambus.Published:
    """Publish ``signal_id`` on ``sw/go`` awaiting ``coordinator``'s signed ACK, while
    ``coordinator`` waits on ``waiter``."""
    outcome: streambus.Published | AckTimeout
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: waiter.wait_for("sw", coordinator, "go", timeout=10))
        try:
            outcome = await sender.publish("sw", "go", None, signal_id=signal_id,
                                           await_acks=[coordinator], ack_timeout=ack_timeout,
                                           require_signed=True)
        except AckTimeout as exc:
            outcome = exc
        tg.cancel_scope.cancel()
    if isinstance(outcome, AckTimeout):
        raise outcome
    return outcome


async def test_a_coordinator_with_the_key_signs_its_ack(signer: Bus, raw: aioredis.Redis
                                                        ) -> None:
    published = await publish_awaiting(signer, signer, "c1", signal_id="a1")
    assert published.acked_by == ("c1",)
    [(_, fields)] = await raw.xrange(signer.keys("sw").acks)
    ack = decode(fields[b"e"])
    assert isinstance(ack, Ack)
    assert ack.key_id == "k1"
    assert Keyring((KEY,)).verify_ack(ack, "sw", "a1", "c1") is None
    assert Keyring((KEY,)).verify_ack(ack, "sw", "a1", "c2") is not None  # not c2's
    assert Keyring((KEY,)).verify_ack(ack, "other", "a1", "c1") is not None  # nor elsewhere


async def test_an_unsigned_ack_does_not_count_and_is_dead_lettered(
        signer: Bus, bus: Bus, raw: aioredis.Redis) -> None:
    with pytest.raises(AckTimeout) as caught:
        await publish_awaiting(signer, bus, "c1", signal_id="u1", ack_timeout=1.0)
    assert caught.value.missing == ("c1",)
    assert caught.value.rejected == {"c1": "unsigned ACK from 'c1' of signal 'u1'"}
    assert "rejected: unsigned ACK from 'c1'" in str(caught.value)
    assert await dead_letters(raw, signer, "sw") == ["unsigned ACK from 'c1' of signal 'u1'"]
    assert (await signer.counters("sw"))["dead_letters"] == 1


async def test_forged_and_misattributed_acks_do_not_count(signer: Bus, raw: aioredis.Redis
                                                           ) -> None:
    """A writer without the key records ACKs straight into Redis: one with a made-up
    signature, one copied from another coordinator (validly signed, but for c1), one id that
    names no entry. None counts; the genuine ACK of c1 does."""
    keys = signer.keys("sw")
    published = await publish_awaiting(signer, signer, "c1", signal_id="s1")
    assert published.acked_by == ("c1",)
    [(genuine_id, fields)] = await raw.xrange(keys.acks)
    genuine = msgspec.json.decode(fields[b"e"])
    forged_id = await raw.xadd(keys.acks, {b"e": msgspec.json.encode(
        {**genuine, "coordinator": "c2", "sig": "\u00e9" * 64})})
    await raw.hset(keys.acked("s1"), mapping={"c2": forged_id, "c3": genuine_id,
                                               "c4": "1-1", "c5": "+", "c6": "no id"})
    with pytest.raises(AckTimeout) as caught:
        await signer.wait_for_acks("sw", "s1", ["c1", "c2", "c3", "c4", "c5", "c6"],
                                   timeout=0.5, require_signed=True)
    assert caught.value.acked_by == ("c1",)
    assert caught.value.rejected == {
        "c2": "ACK from 'c2' of signal 's1' has a bad signature (forged or altered)",
        "c3": "ACK recorded for 'c3' of signal 's1' is 'c1''s of 's1'",
        **{c: f"ACK {ack_id!r} recorded for {c!r} names no ACK entry (trimmed, or never "
              "written)" for c, ack_id in (("c4", "1-1"), ("c5", "+"), ("c6", "no id"))},
    }
    assert len(await dead_letters(raw, signer, "sw")) == 5  # each once, however many wakes


async def test_requiring_signed_acks_without_a_key_publishes_nothing(bus: Bus,
                                                                     raw: aioredis.Redis) -> None:
    with pytest.raises(InvalidInput, match="needs a signing key"):
        await bus.publish("sw", "go", None, signal_id="n1", await_acks=["c1"],
                          require_signed=True)
    assert await raw.xlen(bus.keys("sw").channel("go")) == 0


# -- the CLI ------------------------------------------------------------------------------------

def test_cli_signal_signs_and_wait_verifies(cli: Cli, bus_args: list[str], tmp_path: Path
                                            ) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# newest first\nk2:second-secret-0123456789\nk1:first-secret-0123456789\n")
    signing = {"STREAMBUS_SIGNING_KEY_FILE": str(key_file)}
    waiter = cli.start("wait", "sw", "c1", "go", "--timeout", "15s", "--require-signed",
                       *bus_args, env=signing)
    sent = cli.run("signal", "sw", "go", "--payload", '"signed"', "--await-ack", "c1",
                   *bus_args, env={"STREAMBUS_SIGNING_KEY": "k1:first-secret-0123456789"})
    assert sent.returncode == 0, sent.stderr
    code, out, err = finish(waiter)
    assert code == 0, err
    assert one_json_object(out)["payload"] == "signed"

    unsigned = cli.run("signal", "sw", "late", "--signal-id", "plain", *bus_args)
    assert unsigned.returncode == 0
    timed_out = cli.run("wait", "sw", "c1", "late", "--timeout", "500ms", "--require-signed",
                        *bus_args, env=signing)
    assert timed_out.returncode == 2
    assert "unsigned signal 'plain'" in one_line_message(timed_out.stderr)

    no_key = cli.run("wait", "sw", "c1", "go", "--timeout", "1s", "--require-signed", *bus_args)
    assert no_key.returncode == 64
    assert "needs a signing key" in one_line_message(no_key.stderr)
    bad_key = cli.run("signal", "sw", "go", *bus_args, env={"STREAMBUS_SIGNING_KEY": "k1:short"})
    assert bad_key.returncode == 64
    assert "shorter than 16 bytes" in one_line_message(bad_key.stderr)


def test_cli_signal_requires_signed_acks(cli: Cli, bus_args: list[str]) -> None:
    signing = {"STREAMBUS_SIGNING_KEY": "k1:first-secret-0123456789"}
    keyless_waiter = cli.start("wait", "sw", "c9", "go", "--timeout", "15s", *bus_args)
    sent = cli.run("signal", "sw", "go", "--signal-id", "s9", "--await-ack", "c9",
                   "--ack-timeout", "2s", "--require-signed", *bus_args, env=signing)
    assert finish(keyless_waiter)[0] == 0  # it took the signal; its ACK is what fails
    assert sent.returncode == 2
    assert "rejected: unsigned ACK from 'c9' of signal 's9'" in one_line_message(sent.stderr)
    assert one_json_object(sent.stdout)["rejected_acks"] == {
        "c9": "unsigned ACK from 'c9' of signal 's9'"}

    # (A new coordinator on "go" would take s9 first: a channel's signals wait for it.)
    signed_waiter = cli.start("wait", "sw", "c8", "go2", "--timeout", "15s", *bus_args,
                              env=signing)
    sent = cli.run("signal", "sw", "go2", "--await-ack", "c8", "--require-signed",
                   "--ack-timeout", "10s", *bus_args, env=signing)
    assert sent.returncode == 0, sent.stderr
    assert one_json_object(sent.stdout)["acked_by"] == ["c8"]
    assert finish(signed_waiter)[0] == 0

    alone = cli.run("signal", "sw", "go", "--require-signed", *bus_args, env=signing)
    assert alone.returncode == 64
    assert "--await-ack" in one_line_message(alone.stderr)
