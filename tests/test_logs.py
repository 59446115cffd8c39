"""Structured logs: every transition of a wait as one JSON line with its facts."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from streambus.bus import Bus
from streambus.errors import WaitTimeout
from streambus.logs import JsonFormatter
from tests.clitools import Cli, one_json_object
from tests.helpers import until_states

pytestmark = pytest.mark.anyio


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The library's records at INFO, formatted as JSON lines into a buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("streambus")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield buffer
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


async def test_transitions_of_waits_are_json_lines(bus: Bus, json_log: io.StringIO) -> None:
    tracer = TracerProvider(shutdown_on_exit=False).get_tracer("test")
    async with anyio.create_task_group() as tg:
        tg.start_soon(bus.wait_for, "logs", "coord-a", "ch")
        await until_states(bus, "logs", {"coord-a": "waiting"})
        with tracer.start_as_current_span("validate") as span:
            await bus.publish("logs", "ch", 1, signal_id="s-1", await_acks=["coord-a"])
    with pytest.raises(WaitTimeout):
        await bus.wait_for("logs", "coord-a", "ch", timeout=0.05)

    records = lines(json_log.getvalue())
    for record in records:
        assert {"ts", "level", "logger", "message"} <= set(record)
        assert record["ts"].endswith("Z")
    waits = [r for r in records if r.get("coordinator") == "coord-a"]
    assert [(r["event"], r["swarm"], r["channel"], r.get("outcome")) for r in waits] == [
        ("blocking_started", "logs", "ch", None),
        ("signal_received", "logs", "ch", "signaled"),
        ("blocking_started", "logs", "ch", None),
        ("blocking_ended", "logs", "ch", "timeout"),
    ]
    [published] = [r for r in records if r.get("event") == "published"]
    assert (published["swarm"], published["channel"], published["signal_id"]) == (
        "logs", "ch", "s-1")
    trace_id = trace.format_trace_id(span.get_span_context().trace_id)
    received = waits[1]
    assert (published["trace_id"], received["trace_id"]) == (trace_id, trace_id)
    assert received["signal_id"] == "s-1"
    assert received["iteration"] == 1
    assert waits[2]["iteration"] == 2
    assert isinstance(received["latency_ms"], int)
    assert "trace_id" not in waits[0]  # no span was current when the wait began


def test_formatter_keeps_odd_values_and_exceptions_on_one_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.LogRecord("streambus", logging.ERROR, __file__, 1, "failed %s", ("x",),
                                   exc_info=sys.exc_info())
    record.__dict__.update(coordinator="c", detail=object(), iteration=0, outcome="")
    text = JsonFormatter().format(record)
    assert "\n" not in text
    parsed = json.loads(text)
    assert parsed["message"] == "failed x"
    assert parsed["level"] == "ERROR"
    assert parsed["coordinator"] == "c"
    assert parsed["iteration"] == 0
    assert parsed["detail"].startswith("<object object")
    assert "outcome" not in parsed  # empty facts are left out
    assert "ValueError: boom" in parsed["exc"]


def test_cli_log_format_json(cli: Cli, bus_args: list[str]) -> None:
    sent = cli.run("signal", "clilogs", "ch", *bus_args)
    assert sent.returncode == 0, sent.stderr
    waited = cli.run("wait", "clilogs", "coord-a", "ch", "-v", "--log-format", "json",
                     *bus_args)
    assert waited.returncode == 0, waited.stderr
    assert one_json_object(waited.stdout)["coordinator"] == "coord-a"
    records = lines(waited.stderr)
    received = [r for r in records if r.get("event") == "signal_received"]
    assert [(r["coordinator"], r["swarm"], r["channel"], r["outcome"]) for r in received] == [
        ("coord-a", "clilogs", "ch", "signaled")]

    timed_out = cli.run("wait", "clilogs", "coord-a", "ch", "--timeout", "50ms", "-v",
                        *bus_args, env={"STREAMBUS_LOG_FORMAT": "json"})
    assert timed_out.returncode == 2
    *log_lines, verdict = timed_out.stderr.splitlines()
    assert verdict.startswith("streambus: ")  # the one-line verdict stays plain text
    ended = [r for r in lines("\n".join(log_lines)) if r.get("event") == "blocking_ended"]
    assert [r["outcome"] for r in ended] == ["timeout"]


def test_cli_log_format_is_validated(cli: Cli, bus_args: list[str]) -> None:
    bad = cli.run("status", "clilogs", *bus_args, env={"STREAMBUS_LOG_FORMAT": "xml"})
    assert bad.returncode == 64
    assert "STREAMBUS_LOG_FORMAT" in bad.stderr
    quiet = cli.run("status", "clilogs", "--log-format", "json", *bus_args)
    assert quiet.returncode == 0
    assert quiet.stderr == ""
