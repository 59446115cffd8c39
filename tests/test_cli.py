"""The ``streambus`` command line, run as real processes against real servers.

The contract under test: one JSON object on stdout per command, exit codes 0 done, 2 timeout,
4 bus unreachable, 64 invalid input (nothing written), 128+N stopped by signal N (the wait is
recorded as cancelled); options accepted before or after the command name, and from the
environment.
"""

from __future__ import annotations

import signal
import time

import pytest
import redis

from streambus.keys import SwarmKeys
from streambus.server import read_info
from tests.clitools import (
    STREAM_ID,
    UNREACHABLE_URL,
    Cli,
    finish,
    namespace_keys,
    one_json_object,
    one_line_message,
    states,
    status,
    until_states,
)

# -- signal ---------------------------------------------------------------------------------------

def test_signal_prints_one_json_object(cli: Cli, bus_args: list[str], redis_url: str,
                                       namespace: str) -> None:
    result = cli.run("signal", "sw", "loop2-done", "--sender", "validator-1",
                     "--payload", '{"verdict": "PASS", "n": [1, 2]}', "--signal-id", "sig-1",
                     *bus_args)
    assert result.returncode == 0, result.stderr
    obj = one_json_object(result.stdout)
    assert set(obj) >= {"signal_id", "stream_id", "duplicate", "acked_by", "missing_acks"}
    assert obj["signal_id"] == "sig-1"
    assert STREAM_ID.fullmatch(obj["stream_id"])
    assert obj["duplicate"] is False
    assert obj["acked_by"] == []
    assert obj["missing_acks"] == []
    # It really is on the channel's stream, under the entry id it reported.
    client = redis.Redis.from_url(redis_url)
    try:
        entries = client.xrange(SwarmKeys.for_swarm(namespace, "sw").channel("loop2-done"))
    finally:
        client.close()
    assert [entry_id.decode() for entry_id, _ in entries] == [obj["stream_id"]]


def test_signal_without_options_generates_an_id(cli: Cli, bus_args: list[str]) -> None:
    first = one_json_object(cli.run("signal", "sw", "ch", *bus_args).stdout)
    second = one_json_object(cli.run("signal", "sw", "ch", *bus_args).stdout)
    assert first["signal_id"]
    assert second["signal_id"]
    assert first["signal_id"] != second["signal_id"]
    assert first["duplicate"] is False
    assert second["duplicate"] is False


def test_repeated_signal_id_is_reported_as_duplicate_and_delivered_once(
    cli: Cli, bus_args: list[str]
) -> None:
    first = cli.run("signal", "sw", "ch", "--signal-id", "once", "--payload", '"first"',
                    *bus_args)
    again = cli.run("signal", "sw", "ch", "--signal-id", "once", "--payload", '"second"',
                    *bus_args)
    assert first.returncode == 0, first.stderr
    assert again.returncode == 0, again.stderr
    first_obj, again_obj = one_json_object(first.stdout), one_json_object(again.stdout)
    assert first_obj["duplicate"] is False
    assert again_obj["duplicate"] is True
    assert again_obj["stream_id"] == first_obj["stream_id"]

    got = cli.run("wait", "sw", "coord", "ch", "--timeout", "10s", *bus_args)
    assert got.returncode == 0, got.stderr
    assert one_json_object(got.stdout)["payload"] == "first"
    nothing_more = cli.run("wait", "sw", "coord", "ch", "--timeout", "300ms", *bus_args)
    assert nothing_more.returncode == 2, nothing_more.stderr


def test_await_ack_from_a_coordinator_that_never_waits_exits_2(
    cli: Cli, bus_args: list[str]
) -> None:
    result = cli.run("signal", "sw", "ch", "--signal-id", "lonely", "--await-ack", "ghost",
                     "--ack-timeout", "300ms", *bus_args)
    assert result.returncode == 2, result.stderr
    obj = one_json_object(result.stdout)
    assert obj["signal_id"] == "lonely"
    assert obj["missing_acks"] == ["ghost"]
    assert obj["acked_by"] == []
    assert "ghost" in one_line_message(result.stderr)


# -- wait -----------------------------------------------------------------------------------------

def test_scenario_5_signal_before_wait_is_delivered_at_once(cli: Cli, bus_args: list[str]
                                                            ) -> None:
    sent = cli.run("signal", "sw", "done", "--sender", "early-bird", "--payload",
                   '{"ok": true, "items": [1, "two", null]}', *bus_args)
    assert sent.returncode == 0, sent.stderr
    sent_obj = one_json_object(sent.stdout)

    # A long --timeout: only an immediate delivery lets this finish inside the subprocess bound.
    got = cli.run("wait", "sw", "late-coordinator", "done", "--timeout", "1h", *bus_args)
    assert got.returncode == 0, got.stderr
    obj = one_json_object(got.stdout)
    assert obj["signal_id"] == sent_obj["signal_id"]
    assert obj["stream_id"] == sent_obj["stream_id"]
    assert obj["channel"] == "done"
    assert obj["sender"] == "early-bird"
    assert obj["payload"] == {"ok": True, "items": [1, "two", None]}
    assert states(cli, bus_args, "sw") == {"late-coordinator": "signaled"}


def test_wait_times_out_with_exit_2(cli: Cli, bus_args: list[str]) -> None:
    started = time.monotonic()
    result = cli.run("wait", "sw", "patient", "never", "--timeout", "300ms", *bus_args)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "timed out" in one_line_message(result.stderr)
    assert elapsed >= 0.3
    assert states(cli, bus_args, "sw") == {"patient": "timed_out"}


def test_scenario_1_two_waiting_processes_both_get_one_signal(cli: Cli, bus_args: list[str]
                                                              ) -> None:
    waiters = {name: cli.start("wait", "s1", name, "loop2-done", "--timeout", "30s", *bus_args)
               for name in ("coord-a", "coord-b")}
    until_states(cli, bus_args, "s1", {"coord-a": "waiting", "coord-b": "waiting"},
                 list(waiters.values()))

    sent = cli.run("signal", "s1", "loop2-done", "--sender", "coord-c", "--payload",
                   '{"verdict": "PASS"}', "--await-ack", "coord-a", "--await-ack", "coord-b",
                   "--ack-timeout", "10s", *bus_args)
    assert sent.returncode == 0, sent.stderr
    sent_obj = one_json_object(sent.stdout)
    assert sent_obj["acked_by"] == ["coord-a", "coord-b"]
    assert sent_obj["missing_acks"] == []

    for name, process in waiters.items():
        code, out, err = finish(process)
        assert code == 0, err
        obj = one_json_object(out)
        assert obj["signal_id"] == sent_obj["signal_id"], name
        assert obj["stream_id"] == sent_obj["stream_id"]
        assert obj["sender"] == "coord-c"
        assert obj["payload"] == {"verdict": "PASS"}
        assert obj["channel"] == "loop2-done"
    assert states(cli, bus_args, "s1") == {"coord-a": "signaled", "coord-b": "signaled"}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_to_a_blocked_wait_exits_128_plus_n_and_records_cancelled(
    cli: Cli, bus_args: list[str], signum: signal.Signals
) -> None:
    waiter = cli.start("wait", "sw", "victim", "ch", "--timeout", "10m", *bus_args)
    until_states(cli, bus_args, "sw", {"victim": "waiting"}, [waiter])
    waiter.send_signal(signum)
    code, out, err = finish(waiter)
    assert code == 128 + signum, err
    assert out == ""
    assert f"signal {int(signum)}" in one_line_message(err)
    [row] = status(cli, bus_args, "sw")["coordinators"]
    assert row["coordinator"] == "victim"
    assert row["state"] == "cancelled"


# -- status ---------------------------------------------------------------------------------------

def test_status_json_lists_coordinators(cli: Cli, bus_args: list[str]) -> None:
    assert status(cli, bus_args, "empty") == {"swarm": "empty", "coordinators": []}

    assert cli.run("signal", "sw", "ch-1", *bus_args).returncode == 0
    assert cli.run("wait", "sw", "alpha", "ch-1", "--timeout", "5s", *bus_args).returncode == 0
    assert cli.run("wait", "sw", "beta", "ch-2", "--timeout", "100ms", *bus_args).returncode == 2
    obj = status(cli, bus_args, "sw")
    assert set(obj) == {"swarm", "coordinators"}
    assert obj["swarm"] == "sw"
    rows = {row["coordinator"]: row for row in obj["coordinators"]}
    assert set(rows) == {"alpha", "beta"}
    assert (rows["alpha"]["state"], rows["alpha"]["channel"]) == ("signaled", "ch-1")
    assert (rows["beta"]["state"], rows["beta"]["channel"]) == ("timed_out", "ch-2")


def test_status_without_json_is_human_readable(cli: Cli, bus_args: list[str]) -> None:
    assert cli.run("signal", "sw", "ch", *bus_args).returncode == 0
    assert cli.run("wait", "sw", "alpha", "ch", "--timeout", "5s", *bus_args).returncode == 0
    result = cli.run("status", "sw", *bus_args)
    assert result.returncode == 0, result.stderr
    assert "alpha" in result.stdout
    assert "signaled" in result.stdout


# -- invalid input, unreachable bus ---------------------------------------------------------------

INVALID = {
    "swarm with space": ["signal", "bad id", "ch"],
    "swarm with braces": ["signal", "a{b}", "ch"],
    "channel with braces": ["signal", "sw", "a{b}"],
    "channel with colon": ["wait", "sw", "coord", "a:b"],
    "coordinator with space": ["wait", "sw", "bad id", "ch"],
    "signal id with braces": ["signal", "sw", "ch", "--signal-id", "a{b}"],
    "empty signal id": ["signal", "sw", "ch", "--signal-id", ""],
    "empty swarm": ["signal", "", "ch"],
    "empty coordinator": ["wait", "sw", "", "ch"],
    "sender with glob": ["signal", "sw", "ch", "--sender", "x*"],
    "await-ack with space": ["signal", "sw", "ch", "--await-ack", "a b"],
    "65-char swarm": ["signal", "s" * 65, "ch"],
    "invalid json payload": ["signal", "sw", "ch", "--payload", "{not json"],
    "invalid ack timeout": ["signal", "sw", "ch", "--await-ack", "c", "--ack-timeout", "5xs"],
    "invalid wait timeout": ["wait", "sw", "coord", "ch", "--timeout", "5xs"],
    "negative wait timeout": ["wait", "sw", "coord", "ch", "--timeout=-1"],
    "invalid status swarm": ["status", "a{b}", "--json"],
    "missing argument": ["signal", "sw"],
    "unknown command": ["teleport", "sw"],
    "unknown option": ["signal", "sw", "ch", "--no-such-option"],
}


@pytest.mark.parametrize("args", INVALID.values(), ids=INVALID.keys())
def test_invalid_input_exits_64_and_writes_nothing(
    cli: Cli, bus_args: list[str], redis_url: str, namespace: str, args: list[str]
) -> None:
    result = cli.run(*args, *bus_args)
    assert result.returncode == 64, (result.stdout, result.stderr)
    assert result.stdout == ""
    one_line_message(result.stderr)
    assert namespace_keys(redis_url, namespace) == []


def test_too_deeply_nested_payload_exits_64(cli: Cli, namespace: str) -> None:
    """Valid JSON the bus cannot take is invalid input too: 64 and one line, no traceback.

    The URL is unreachable on purpose: input is checked before anything connects, so the
    expected exit is 64, not 4.
    """
    payload = "[" * 5000 + "]" * 5000
    result = cli.run("signal", "sw", "ch", "--payload", payload,
                     "--redis-url", UNREACHABLE_URL, "--namespace", namespace)
    assert "Traceback" not in result.stderr, result.stderr[-500:]
    assert result.returncode == 64, result.stderr[-500:]
    one_line_message(result.stderr)


def test_invalid_namespace_exits_64(cli: Cli, redis_url: str) -> None:
    result = cli.run("signal", "sw", "ch", "--redis-url", redis_url, "--namespace", "bad{ns}")
    assert result.returncode == 64, result.stderr
    assert "namespace" in one_line_message(result.stderr)
    assert namespace_keys(redis_url, "bad{ns}") == []


def test_invalid_redis_url_exits_64(cli: Cli, namespace: str) -> None:
    result = cli.run("signal", "sw", "ch", "--redis-url", "http://127.0.0.1:6379",
                     "--namespace", namespace)
    assert result.returncode == 64, result.stderr
    one_line_message(result.stderr)


@pytest.mark.parametrize(
    "args", [["signal", "sw", "ch"], ["wait", "sw", "coord", "ch", "--timeout", "5s"],
             ["status", "sw", "--json"]],
    ids=["signal", "wait", "status"],
)
def test_unreachable_bus_exits_4(cli: Cli, namespace: str, args: list[str]) -> None:
    result = cli.run(*args, "--redis-url", UNREACHABLE_URL, "--namespace", namespace)
    assert result.returncode == 4, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "unavailable" in one_line_message(result.stderr)


# -- where options come from ----------------------------------------------------------------------

def test_options_before_the_command_name(cli: Cli, redis_url: str, namespace: str) -> None:
    sent = cli.run("--redis-url", redis_url, "--namespace", namespace, "signal", "sw", "ch",
                   "--payload", "1")
    assert sent.returncode == 0, sent.stderr
    assert namespace_keys(redis_url, namespace), "nothing written under --namespace"
    # After the command name, and split both ways: they reach the same namespace.
    got = cli.run("--redis-url", redis_url, "wait", "sw", "coord", "ch", "--timeout", "5s",
                  "--namespace", namespace)
    assert got.returncode == 0, got.stderr
    assert one_json_object(got.stdout)["signal_id"] == one_json_object(sent.stdout)["signal_id"]
    assert read_info(cli.home) is None, "embedded server used"


def test_options_from_the_environment(cli: Cli, redis_url: str, namespace: str) -> None:
    env = {"STREAMBUS_REDIS_URL": redis_url, "STREAMBUS_NAMESPACE": namespace}
    sent = cli.run("signal", "sw", "ch", "--payload", '"via env"', env=env)
    assert sent.returncode == 0, sent.stderr
    assert namespace_keys(redis_url, namespace), "nothing written under STREAMBUS_NAMESPACE"
    got = cli.run("wait", "sw", "coord", "ch", "--timeout", "5s",
                  "--redis-url", redis_url, "--namespace", namespace)
    assert got.returncode == 0, got.stderr
    assert one_json_object(got.stdout)["payload"] == "via env"
    assert read_info(cli.home) is None, "embedded server used"


def test_arguments_override_the_environment(cli: Cli, redis_url: str, namespace: str) -> None:
    env = {"STREAMBUS_REDIS_URL": UNREACHABLE_URL, "STREAMBUS_NAMESPACE": f"{namespace}-env"}
    sent = cli.run("signal", "sw", "ch", "--redis-url", redis_url, "--namespace", namespace,
                   env=env)
    assert sent.returncode == 0, sent.stderr
    assert namespace_keys(redis_url, namespace)
    assert namespace_keys(redis_url, f"{namespace}-env") == []
