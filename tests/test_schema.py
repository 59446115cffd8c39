"""The event schema holds to its evolution rules; keys and durations are validated.

The files in ``tests/fixtures/events`` are v1 events exactly as streambus encoded them when the
schema was first written. They are decoded here as they are, never regenerated: if a change to
:mod:`streambus.schema` makes one of them undecodable (or decode differently), entries already
sitting in users' streams would break the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import msgspec
import pytest
from redis.crc import key_slot

from streambus import schema
from streambus.cfn import events as cfn_events
from streambus.cfn.events import Verdict
from streambus.config import parse_duration
from streambus.errors import InvalidId, InvalidInput, MalformedEvent, UnknownEvent
from streambus.keys import SwarmKeys, validate_id
from streambus.schema import (
    FIELD,
    Ack,
    BlockingEnded,
    BlockingStarted,
    Event,
    EventDecoder,
    Heartbeat,
    Outcome,
    RetryRequest,
    Signal,
    SignalReceived,
    decode,
    decode_fields,
    encode,
)

FIXTURES = Path(__file__).parent / "fixtures" / "events"

# What each fixture file must decode to. Written out by hand: never derived from the encoder.
EXPECTED: dict[str, Event] = {
    "signal": Signal(
        v=1, signal_id="sig-0001", swarm="epic-7", channel="loop2-done", sender="validator-1",
        payload={"verdict": "PASS", "score": 0.93, "files": ["a.py", "b.py"],
                 "nested": {"n": 1, "none": None}},
        trace={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
               "tracestate": "vendor=1"},
    ),
    "ack": Ack(v=1, coordinator="coordinator-a", signal_id="sig-0001", channel="loop2-done",
               stream_id="1716000000000-0", iteration=3),
    "heartbeat": Heartbeat(v=1, coordinator="coordinator-a", seq=42, interval_ms=5000),
    "retry_request": RetryRequest(
        v=1, coordinator="coordinator-b", request_id="retry-17", requested_by="validator-2",
        reason="tests failing", blockers=["test_x fails", "lint"], payload={"attempt": 2},
        iteration=4,
    ),
    "verdict": Verdict(
        v=1, validator_id="validator-1", validator_type="security", confidence=0.87,
        vote="FAIL", reasoning="token logged in plain text", blockers=["secret in log"],
        recommendations=["redact tokens"], round=2,
    ),
    "blocking_started": BlockingStarted(
        v=1, coordinator="coordinator-a", channel="loop2-done", iteration=3,
        started_ms=1716000000000, deadline_ms=1716001800000, resumed=True,
    ),
    "signal_received": SignalReceived(
        v=1, coordinator="coordinator-a", channel="loop2-done", signal_id="sig-0001",
        stream_id="1716000000123-0", iteration=3,
    ),
    "blocking_ended": BlockingEnded(
        v=1, coordinator="coordinator-a", channel="loop2-done", iteration=3,
        outcome=Outcome.SIGNALED, signal_id="sig-0001", detail="received",
    ),
}
NAMES = sorted(EXPECTED)
CFN: Final = {"verdict"}
"""Fixtures of the CFN Loop's events, decoded by its own decoder (same wire tags as ever)."""


def decoder_for(name: str) -> EventDecoder[Any]:
    return cfn_events._decoder if name in CFN else schema._core


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / f"{name}.json").read_bytes()


def fixture_object(name: str) -> dict[str, Any]:
    obj = json.loads(fixture_bytes(name))
    assert isinstance(obj, dict)
    return obj


def test_there_is_one_fixture_per_event_type() -> None:
    assert sorted(p.stem for p in FIXTURES.glob("*.json")) == NAMES
    assert {type(e) for e in EXPECTED.values()} == {
        Signal, Ack, Heartbeat, RetryRequest, Verdict, BlockingStarted, SignalReceived,
        BlockingEnded,
    }
    # Each file carries its own type tag and the v1 schema version.
    for name in NAMES:
        assert fixture_object(name)["type"] == name
        assert fixture_object(name)["v"] == 1


@pytest.mark.parametrize("name", NAMES)
def test_fixture_decodes_to_its_type_with_its_values(name: str) -> None:
    event = decoder_for(name).decode(fixture_bytes(name))
    expected = EXPECTED[name]
    assert type(event) is type(expected)
    assert msgspec.structs.asdict(event) == msgspec.structs.asdict(expected)
    assert event == expected


@pytest.mark.parametrize("name", NAMES)
def test_fixture_decodes_from_a_stream_entry_field_map(name: str) -> None:
    event = decoder_for(name).decode_fields({FIELD: fixture_bytes(name), b"other": b"ignored"})
    assert event == EXPECTED[name]


@pytest.mark.parametrize("name", NAMES)
def test_unknown_fields_of_a_newer_writer_are_ignored(name: str) -> None:
    obj = fixture_object(name)
    obj["added_in_v7"] = {"anything": [1, 2, 3]}
    obj["zz_flag"] = True
    event = decoder_for(name).decode(json.dumps(obj).encode())
    assert event == EXPECTED[name]


@pytest.mark.parametrize("name", NAMES)
def test_a_higher_schema_version_is_not_rejected(name: str) -> None:
    obj = fixture_object(name)
    obj["v"] = 2
    event = decoder_for(name).decode(json.dumps(obj).encode())
    assert type(event) is type(EXPECTED[name])
    assert event.v == 2
    assert msgspec.structs.replace(event, v=1) == EXPECTED[name]


def test_an_event_without_v_gets_the_current_version() -> None:
    obj = fixture_object("heartbeat")
    del obj["v"]
    assert decode(json.dumps(obj).encode()) == EXPECTED["heartbeat"]


def test_optional_fields_default_when_absent() -> None:
    event = decode(b'{"type":"signal","signal_id":"s","swarm":"w","channel":"c"}')
    assert event == Signal(signal_id="s", swarm="w", channel="c")
    assert isinstance(event, Signal)
    assert (event.sender, event.payload, event.trace, event.v) == ("", None, {}, 1)


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_equals_the_original(name: str) -> None:
    original = EXPECTED[name]
    assert decoder_for(name).decode(encode(original)) == original
    assert decoder_for(name).decode_fields({FIELD: encode(original)}) == original


def _verdict(**changes: Any) -> bytes:
    obj = fixture_object("verdict") | changes
    return json.dumps(obj).encode()


def _without(name: str, field: str) -> bytes:
    obj = fixture_object(name)
    del obj[field]
    return json.dumps(obj).encode()


def _deeply_nested_signal(depth: int) -> bytes:
    return (b'{"type":"signal","signal_id":"s","swarm":"w","channel":"c","payload":'
            + b"[" * depth + b"]" * depth + b"}")


MALFORMED = {
    "unknown type tag": b'{"type":"teleport","v":1,"coordinator":"c"}',
    "no type tag": b'{"v":1,"coordinator":"c","seq":1}',
    "malformed json": b'{"type":"signal","signal_id":',
    "not json at all": b"\xff\xfe garbage",
    "empty": b"",
    "json null": b"null",
    "json array": b'[{"type":"heartbeat","coordinator":"c"}]',
    "int where str": (b'{"type":"ack","coordinator":7,"signal_id":"s","channel":"c",'
                      b'"stream_id":"1-0","iteration":1}'),
    "str where int": (b'{"type":"ack","coordinator":"c","signal_id":"s","channel":"c",'
                      b'"stream_id":"1-0","iteration":"three"}'),
    "bool where int": (b'{"type":"ack","coordinator":"c","signal_id":"s","channel":"c",'
                       b'"stream_id":"1-0","iteration":true}'),
    "v is a string": b'{"type":"heartbeat","v":"1","coordinator":"c"}',
    "trace value not str": (b'{"type":"signal","signal_id":"s","swarm":"w","channel":"c",'
                            b'"trace":{"traceparent":1}}'),
    "unknown outcome": (b'{"type":"blocking_ended","coordinator":"c","channel":"c",'
                        b'"iteration":1,"outcome":"exploded"}'),
    "missing signal_id": _without("signal", "signal_id"),
    "missing coordinator": _without("ack", "coordinator"),
    "missing outcome": _without("blocking_ended", "outcome"),
}


MALFORMED_CFN = {
    "confidence above 1": _verdict(confidence=1.01),
    "confidence below 0": _verdict(confidence=-0.01),
    "confidence a string": _verdict(confidence="high"),
    "vote not PASS/FAIL": _verdict(vote="MAYBE"),
    "missing confidence": _without("verdict", "confidence"),
}


@pytest.mark.parametrize("raw", MALFORMED_CFN.values(), ids=MALFORMED_CFN.keys())
def test_malformed_cfn_events_raise_malformed_event_not_unknown(raw: bytes) -> None:
    with pytest.raises(MalformedEvent) as caught:
        cfn_events.decode(raw)
    assert not isinstance(caught.value, UnknownEvent)
    assert caught.value.reason


def test_an_unknown_type_of_a_newer_writer_is_an_unknown_event_not_poison() -> None:
    """Rule 3: an event type a newer writer added is skipped by older readers, not
    dead-lettered: it decodes as UnknownEvent (a MalformedEvent, for readers that predate it),
    and keeps its fields."""
    fields = {FIELD: b'{"type":"teleport","v":3,"coordinator":"c"}'}
    with pytest.raises(UnknownEvent) as caught:
        decode_fields(fields)
    assert (caught.value.event_type, caught.value.fields) == ("teleport", fields)
    # The core's events are unknown to the CFN decoder, and the CFN's to the core's.
    with pytest.raises(UnknownEvent):
        decode(fixture_bytes("verdict"))
    with pytest.raises(UnknownEvent):
        cfn_events.decode(fixture_bytes("signal"))


@pytest.mark.parametrize("raw", [b'{"type":7}', b'{"no":"tag"}', b"[1]", b'{"type":"ack","v":"x"}'])
def test_a_broken_event_is_malformed_not_unknown(raw: bytes) -> None:
    with pytest.raises(MalformedEvent) as caught:
        decode(raw)
    assert not isinstance(caught.value, UnknownEvent)


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_events_raise_malformed_event(raw: bytes) -> None:
    with pytest.raises(MalformedEvent) as caught:
        decode(raw)
    assert not isinstance(caught.value, msgspec.MsgspecError)
    assert caught.value.__cause__ is None
    assert caught.value.reason


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_entry_keeps_its_fields_for_the_dead_letter(raw: bytes) -> None:
    fields = {FIELD: raw, b"x": b"y"}
    with pytest.raises(MalformedEvent) as caught:
        decode_fields(fields)
    assert caught.value.fields == fields


def test_deeply_nested_poison_entry_is_malformed_not_a_recursion_error() -> None:
    """An entry any client could XADD must be poison (dead-lettered), not crash the reader.

    The dispatcher catches MalformedEvent only; a RecursionError escaping ``decode`` would take
    it down instead of moving the entry aside.
    """
    fields = {FIELD: _deeply_nested_signal(5000)}
    with pytest.raises(MalformedEvent) as caught:
        decode_fields(fields)
    assert caught.value.fields == fields


def test_confidence_bounds_are_inclusive() -> None:
    for confidence in (0.0, 1.0):
        event = cfn_events.decode(_verdict(confidence=confidence))
        assert isinstance(event, Verdict)
        assert event.confidence == confidence


def test_entry_without_a_body_is_malformed() -> None:
    with pytest.raises(MalformedEvent, match="no body"):
        decode_fields(None)


def test_entry_without_the_event_field_is_malformed() -> None:
    fields = {b"payload": fixture_bytes("signal")}
    with pytest.raises(MalformedEvent) as caught:
        decode_fields(fields)
    assert caught.value.fields == fields
    with pytest.raises(MalformedEvent):
        decode_fields({})
    # The field name is bytes: a str key (a client decoding responses) is not the event field.
    with pytest.raises(MalformedEvent):
        decode_fields({"e": fixture_bytes("signal")})  # type: ignore[dict-item]


# -- keys ----------------------------------------------------------------------------------------

VALID_IDS = ["a", "Z", "0", "9lives", "a.b_c-d", "epic-7", "A" * 64, "x" + "-" * 63,
             "coordinator.1_2-3"]
INVALID_IDS: list[object] = [
    "", "A" * 65, "x" + "-" * 64, "-lead", ".lead", "_lead", "has space", "tab\there",
    "a{b}", "{tag}", "a}", "a{", "a*", "a?", "a[b]", "a:b", "a/b", "a\\b", "trailing\n",
    "\nleading", "caf\u00e9", "\u0661", None, 7, b"bytes", ["a"],
]


@pytest.mark.parametrize("value", VALID_IDS)
def test_valid_ids_are_returned_unchanged(value: str) -> None:
    assert validate_id(value) == value


@pytest.mark.parametrize("value", INVALID_IDS, ids=repr)
def test_invalid_ids_are_rejected(value: object) -> None:
    with pytest.raises(InvalidId) as caught:
        validate_id(value, "swarm")
    assert isinstance(caught.value, InvalidInput)
    assert "invalid swarm" in str(caught.value)


def test_ids_may_be_64_characters_but_not_65() -> None:
    assert validate_id("a" * 64) == "a" * 64
    with pytest.raises(InvalidId):
        validate_id("a" * 65)


def _all_keys(keys: SwarmKeys) -> list[str]:
    return [keys.channel("loop2-done"), keys.channel("other"), keys.acks,
            keys.acked("sig-1"), keys.dedupe("sig-1"), keys.events, keys.state("coord-a"),
            keys.state("coord-b"), keys.coordinators, keys.dead_letters, keys.counters]


def test_every_key_carries_the_swarm_hash_tag_and_the_namespace() -> None:
    keys = SwarmKeys.for_swarm("ns1", "epic-7")
    all_keys = _all_keys(keys)
    assert len(set(all_keys)) == len(all_keys)  # no two kinds collide
    for key in all_keys:
        assert key.startswith("ns1:{epic-7}:")
        # Exactly one brace pair, so Redis Cluster hashes on the swarm and nothing else.
        assert key.count("{") == 1
        assert key.count("}") == 1


def test_keys_of_one_swarm_share_one_cluster_slot() -> None:
    keys = SwarmKeys.for_swarm("ns1", "epic-7")
    slots = {key_slot(key.encode()) for key in _all_keys(keys)}
    assert slots == {key_slot(b"epic-7")}
    other_ns = SwarmKeys.for_swarm("another-namespace", "epic-7")
    assert {key_slot(k.encode()) for k in _all_keys(other_ns)} == slots


def test_keys_of_different_swarms_or_namespaces_differ() -> None:
    a = _all_keys(SwarmKeys.for_swarm("ns", "s1"))
    b = _all_keys(SwarmKeys.for_swarm("ns", "s2"))
    c = _all_keys(SwarmKeys.for_swarm("ns2", "s1"))
    assert not set(a) & set(b)
    assert not set(a) & set(c)


@pytest.mark.parametrize(
    ("namespace", "swarm"), [("bad ns", "s"), ("ns", "bad{swarm}"), ("ns", ""), ("", "s"),
                             ("n:s", "s"), ("ns", "s" * 65)],
)
def test_swarm_keys_reject_invalid_namespace_or_swarm(namespace: str, swarm: str) -> None:
    with pytest.raises(InvalidId):
        SwarmKeys.for_swarm(namespace, swarm)


@pytest.mark.parametrize("bad", ["", "a b", "{x}", "a:b", "*", "x" * 65])
def test_per_id_keys_validate_their_id(bad: str) -> None:
    keys = SwarmKeys.for_swarm("ns", "s")
    for build in (keys.channel, keys.acked, keys.dedupe, keys.state):
        with pytest.raises(InvalidId):
            build(bad)


# -- durations -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1.5", 1.5), ("0", 0.0), ("30", 30.0), (".5", 0.5), ("2.", 2.0), ("500ms", 0.5),
     ("1ms", 0.001), ("5s", 5.0), ("0.25s", 0.25), ("2m", 120.0), ("1h", 3600.0),
     ("1.5h", 5400.0), (" 5s ", 5.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", " ", "5xs", "abc", "s", "ms", "-1", "-5s", "+5s", "5 s", "1.5.5", "1e3", "inf",
             "nan", "5d", "5sec", "1h30m", "5S", "0x10"],
)
def test_invalid_durations_raise_invalid_input(text: str) -> None:
    with pytest.raises(InvalidInput, match="invalid duration"):
        parse_duration(text)
