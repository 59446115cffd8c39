"""Liveness, outages, retries, the watchdog and clock skew through the ``streambus`` CLI.

Every command runs as a real ``python -m streambus`` process against a real server. The exit
codes under test: 0 done (and a signalled heartbeat/watchdog), 2 timeout, 3 a watched peer is
dead, 4 the bus stayed unreachable past the reconnect budget, 5 a retry backlog is full, 64
invalid input (nothing written).

Clock skew is simulated without libfaketime: a ``sitecustomize.py`` on ``PYTHONPATH`` shifts
the child's wall clock (``time.time``, ``time.time_ns``, ``datetime.datetime.now``) and leaves
its monotonic clock alone, which is what a badly set system clock looks like to a process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from streambus.keys import SwarmKeys
from streambus.schema import CoordinatorDead, RetryRequest, decode_fields
from tests.clitools import (
    PROCESS_TIMEOUT_S,
    STREAM_ID,
    Cli,
    finish,
    namespace_keys,
    one_json_object,
    one_line_message,
    status,
    until_states,
)
from tests.servers import ServerProcess

SKEW_S = 300.0
"""Five minutes: far more than any deadline or dead-after used here."""


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


def server_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def poll(condition: Callable[[], Any], what: str, *, watching: list[subprocess.Popen[str]],
         timeout: float = 10.0) -> Any:
    """Poll ``condition`` until it returns something truthy (bounded); return that.

    Fails at once, with the process's output, if a process that must keep running exits.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in watching:
            if process.poll() is not None:
                code, out, err = finish(process)
                pytest.fail(f"{process.args} exited {code} early: {out!r} {err!r}")
        if result := condition():
            return result
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def alive_score(client: redis.Redis, namespace: str, swarm: str, coordinator: str
                ) -> int | None:
    score = client.zscore(SwarmKeys.for_swarm(namespace, swarm).alive, coordinator)
    return None if score is None else int(score)


def until_beating(client: redis.Redis, namespace: str, swarm: str, coordinator: str,
                  process: subprocess.Popen[str], *, after: int | None = None) -> int:
    """The coordinator's alive score once it is recorded (and above ``after``, if given)."""
    def beat() -> int | None:
        score = alive_score(client, namespace, swarm, coordinator)
        return score if score is not None and (after is None or score > after) else None

    return int(poll(beat, f"a heartbeat of {coordinator} after {after}", watching=[process]))


def last_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert lines, "expected a message on stderr"
    return lines[-1]


def row_of(cli: Cli, bus_args: list[str], swarm: str, coordinator: str) -> dict[str, Any]:
    [row] = [r for r in status(cli, bus_args, swarm)["coordinators"]
             if r["coordinator"] == coordinator]
    return row


# -- heartbeat ------------------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_heartbeat_beats_in_server_time_until_a_signal_ends_it_with_exit_0(
    cli: Cli, bus_args: list[str], client: redis.Redis, namespace: str, signum: signal.Signals
) -> None:
    beating = cli.start("heartbeat", "hbs", "coord", "--interval", "200ms", *bus_args)
    first = until_beating(client, namespace, "hbs", "coord", beating)
    second = until_beating(client, namespace, "hbs", "coord", beating, after=first)
    third = until_beating(client, namespace, "hbs", "coord", beating, after=second)
    assert first < second < third
    # Scores are the server's clock (ms), not a counter or the local clock.
    assert 0 <= server_ms(client) - third < 5000
    beating.send_signal(signum)
    code, out, err = finish(beating)
    assert code == 0, err
    assert out == ""
    assert "Traceback" not in err, err


# -- plan scenario 3: a watched peer dies ---------------------------------------------------------

def test_scenario_3_wait_exits_3_when_the_watched_heartbeat_process_is_killed(
    cli: Cli, bus_args: list[str], client: redis.Redis, namespace: str
) -> None:
    peer = cli.start("heartbeat", "s3", "peer-p", "--interval", "200ms", *bus_args)
    until_beating(client, namespace, "s3", "peer-p", peer)
    waiter = cli.start("wait", "s3", "waiter-w", "ch", "--watch", "peer-p", "--dead-after", "1s",
                       "--heartbeat-interval", "200ms", "--timeout", "30s", *bus_args)
    until_states(cli, bus_args, "s3", {"waiter-w": "waiting"}, [waiter, peer])

    peer.kill()  # kill -9: no goodbye, the beats just stop
    peer.wait()
    killed_at = time.monotonic()
    code, out, err = finish(waiter)
    assert code == 3, (out, err)
    assert out == ""
    assert "Traceback" not in err, err
    final = last_line(err)
    assert final.startswith("streambus: peer dead")
    assert "peer-p" in final
    # Far inside the 30 s wait timeout: dead-after (1 s) plus a few checks and process exit.
    assert time.monotonic() - killed_at < 5

    row = row_of(cli, bus_args, "s3", "waiter-w")
    assert row["state"] == "peer_dead"
    last_beat = alive_score(client, namespace, "s3", "peer-p")
    assert last_beat is not None
    detected_after_s = (row["ended_ms"] - last_beat) / 1000  # server time on both ends
    assert 1.0 < detected_after_s < 3.0
    # Last, so that everything above is checked whatever this finds: stderr is one line.
    assert one_line_message(err) == final


def test_a_live_watched_peer_lets_the_wait_time_out_with_exit_2(
    cli: Cli, bus_args: list[str], client: redis.Redis, namespace: str
) -> None:
    peer = cli.start("heartbeat", "s3c", "peer-p", "--interval", "200ms", *bus_args)
    until_beating(client, namespace, "s3c", "peer-p", peer)
    result = cli.run("wait", "s3c", "waiter-w", "ch", "--watch", "peer-p", "--dead-after", "1s",
                     "--heartbeat-interval", "200ms", "--timeout", "2s", *bus_args)
    assert result.returncode == 2, result.stderr
    assert "timed out" in one_line_message(result.stderr)
    assert peer.poll() is None, "the peer stopped beating: the control proves nothing"
    assert row_of(cli, bus_args, "s3c", "waiter-w")["state"] == "timed_out"


# -- the bus goes away mid-wait -------------------------------------------------------------------

def test_wait_exits_4_when_the_server_dies_past_the_reconnect_budget(
    cli: Cli, own_server: ServerProcess, namespace: str
) -> None:
    args = ["--redis-url", own_server.url, "--namespace", namespace]
    waiter = cli.start("wait", "gone", "c", "ch", "--timeout", "30s", "--reconnect-budget",
                       "500ms", *args)
    until_states(cli, args, "gone", {"c": "waiting"}, [waiter])

    own_server.kill()
    killed_at = time.monotonic()
    code, out, err = finish(waiter)
    elapsed = time.monotonic() - killed_at
    assert code == 4, (out, err)
    assert out == ""
    assert "Traceback" not in err, err
    final = last_line(err)
    assert final.startswith("streambus: bus unavailable")
    assert "reconnect budget" in final
    assert 0.5 <= elapsed < 5, elapsed
    # Last, so that everything above is checked whatever this finds: stderr is one line.
    assert one_line_message(err) == final


# -- retry requests -------------------------------------------------------------------------------

def retry_entries(client: redis.Redis, namespace: str, swarm: str, coordinator: str
                  ) -> list[tuple[str, Any]]:
    stream = SwarmKeys.for_swarm(namespace, swarm).retries(coordinator)
    return [(entry_id.decode(), decode_fields(fields))
            for entry_id, fields in client.xrange(stream)]


def test_retry_prints_json_is_idempotent_and_exits_5_when_the_backlog_is_full(
    cli: Cli, bus_args: list[str], client: redis.Redis, namespace: str
) -> None:
    request = ["retry", "rs", "coord", "--reason", "R", "--blocker", "B1", "--blocker", "B2"]
    first = cli.run(*request, "--request-id", "r1", *bus_args)
    assert first.returncode == 0, first.stderr
    sent = one_json_object(first.stdout)
    assert set(sent) == {"request_id", "stream_id", "duplicate"}
    assert sent["request_id"] == "r1"
    assert STREAM_ID.fullmatch(sent["stream_id"])
    assert sent["duplicate"] is False
    [(entry_id, event)] = retry_entries(client, namespace, "rs", "coord")
    assert entry_id == sent["stream_id"]
    assert isinstance(event, RetryRequest)
    assert (event.coordinator, event.request_id) == ("coord", "r1")
    assert (event.reason, event.blockers) == ("R", ["B1", "B2"])

    again = cli.run(*request, "--request-id", "r1", *bus_args)
    assert again.returncode == 0, again.stderr
    assert one_json_object(again.stdout) == {**sent, "duplicate": True}
    assert len(retry_entries(client, namespace, "rs", "coord")) == 1

    # r1 is still pending (nobody consumes it): a backlog of 1 is full.
    full = cli.run(*request, "--request-id", "r2", "--backlog-limit", "1", *bus_args)
    assert full.returncode == 5, (full.stdout, full.stderr)
    assert full.stdout == ""
    assert "backlog" in one_line_message(full.stderr)
    assert len(retry_entries(client, namespace, "rs", "coord")) == 1
    # Nothing of r2 was recorded: sent again with room, it is new, not a duplicate.
    later = cli.run(*request, "--request-id", "r2", *bus_args)
    assert later.returncode == 0, later.stderr
    assert one_json_object(later.stdout)["duplicate"] is False
    assert len(retry_entries(client, namespace, "rs", "coord")) == 2


def test_retry_with_an_invalid_request_id_exits_64_and_writes_nothing(
    cli: Cli, bus_args: list[str], redis_url: str, namespace: str
) -> None:
    result = cli.run("retry", "rs", "coord", "--reason", "R", "--blocker", "B1",
                     "--request-id", "bad id", *bus_args)
    assert result.returncode == 64, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "request id" in one_line_message(result.stderr)
    assert namespace_keys(redis_url, namespace) == []


# -- watchdog -------------------------------------------------------------------------------------

def dead_events(client: redis.Redis, namespace: str, swarm: str) -> list[CoordinatorDead]:
    stream = SwarmKeys.for_swarm(namespace, swarm).events
    events = [decode_fields(fields) for _, fields in client.xrange(stream)]
    return [event for event in events if isinstance(event, CoordinatorDead)]


def test_watchdog_reports_a_killed_heartbeat_process_and_exits_0_on_sigterm(
    cli: Cli, bus_args: list[str], client: redis.Redis, namespace: str
) -> None:
    mortal = cli.start("heartbeat", "wd", "coord-x", "--interval", "100ms", *bus_args)
    until_beating(client, namespace, "wd", "coord-x", mortal)
    watchdog = cli.start("watchdog", "wd", "--dead-after", "500ms", "--interval", "100ms",
                         *bus_args)
    mortal.kill()
    mortal.wait()

    [event] = poll(lambda: dead_events(client, namespace, "wd"),
                   "a coordinator_dead event", watching=[watchdog], timeout=5)
    assert event.coordinator == "coord-x"
    assert event.dead_after_ms == 500
    # Reported for its very last beat, after that beat had lapsed (server time).
    assert event.last_beat_ms == alive_score(client, namespace, "wd", "coord-x")
    assert event.detected_ms - event.last_beat_ms > 500

    watchdog.send_signal(signal.SIGTERM)
    code, out, err = finish(watchdog)
    assert code == 0, err
    assert out == ""
    assert "Traceback" not in err, err
    assert [e.coordinator for e in dead_events(client, namespace, "wd")] == ["coord-x"]


# -- clock skew (plan chaos test 3) ---------------------------------------------------------------

SITECUSTOMIZE = textwrap.dedent('''\
    """Test-only: shift this process's wall clock by $STREAMBUS_TEST_CLOCK_SKEW_S seconds.

    Monotonic clocks are left alone, as on a machine whose system clock is set wrong.
    """
    import datetime as _datetime
    import os as _os
    import time as _time

    _SKEW_S = float(_os.environ.get("STREAMBUS_TEST_CLOCK_SKEW_S", "0"))
    _SKEW_NS = round(_SKEW_S * 1e9)
    _real_time, _real_time_ns = _time.time, _time.time_ns
    _Datetime = _datetime.datetime


    def _skewed_time():
        return _real_time() + _SKEW_S


    def _skewed_time_ns():
        return _real_time_ns() + _SKEW_NS


    class _SkewedDatetime(_Datetime):
        @classmethod
        def now(cls, tz=None):
            return cls.fromtimestamp(_skewed_time(), tz)

        @classmethod
        def utcnow(cls):
            return cls.fromtimestamp(_skewed_time(), _datetime.timezone.utc).replace(tzinfo=None)

        @classmethod
        def today(cls):
            return cls.now()


    if _SKEW_S:
        _time.time = _skewed_time
        _time.time_ns = _skewed_time_ns
        _datetime.datetime = _SkewedDatetime
''')

PROBE = ("import datetime, json, time; "
         "print(json.dumps([time.time(), time.time_ns() / 1e9, "
         "datetime.datetime.now().timestamp()]))")


@pytest.fixture
def skewed_env(cli: Cli, tmp_path: Path) -> Callable[[float], dict[str, str]]:
    """``skewed_env(seconds)``: extra environment that shifts a child's wall clock, verified."""
    directory = tmp_path / "clock-skew"
    directory.mkdir()
    (directory / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(directory), os.environ.get("PYTHONPATH")) if p)

    def env_for(seconds: float) -> dict[str, str]:
        extra = {"PYTHONPATH": path, "STREAMBUS_TEST_CLOCK_SKEW_S": str(seconds)}
        before = time.time()
        probe = subprocess.run([sys.executable, "-c", PROBE], env=cli.env | extra,
                               capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S,
                               check=False)
        after = time.time()
        assert probe.returncode == 0, probe.stderr
        for clock in json.loads(probe.stdout):  # time.time, time.time_ns, datetime.now
            assert before + seconds - 1 <= clock <= after + seconds + 1, (clock, before, seconds)
        return extra

    return env_for


@pytest.mark.parametrize("skew_s", [SKEW_S, -SKEW_S], ids=["plus-5m", "minus-5m"])
def test_a_skewed_wall_clock_does_not_move_the_wait_deadline(
    cli: Cli, bus_args: list[str], client: redis.Redis, namespace: str,
    skewed_env: Callable[[float], dict[str, str]], skew_s: float
) -> None:
    env = skewed_env(skew_s)
    started = time.monotonic()
    result = cli.run("wait", "skew", "w", "ch", "--timeout", "800ms", *bus_args, env=env)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "timed out" in one_line_message(result.stderr)
    # Far below the skew (5 min) whatever the load: a deadline moved by the skew shows here;
    # the precise check is the server-time one below.
    assert 0.7 <= elapsed < abs(skew_s) / 5, elapsed

    state = {k.decode(): v.decode()
             for k, v in client.hgetall(SwarmKeys.for_swarm(namespace, "skew").state("w")).items()}
    assert state["state"] == "timed_out"
    started_ms, deadline_ms = int(state["started_ms"]), int(state["deadline_ms"])
    assert deadline_ms - started_ms == 800
    assert 0 <= server_ms(client) - started_ms < 5000, "start not in server time"
    # It really blocked until the deadline, measured on the server's clock.
    assert 800 <= int(state["ended_ms"]) - started_ms < 5000
    assert row_of(cli, bus_args, "skew", "w")["deadline_ms"] == deadline_ms


def test_a_skewed_clock_does_not_make_a_live_peer_look_dead(
    cli: Cli, bus_args: list[str], client: redis.Redis, namespace: str,
    skewed_env: Callable[[float], dict[str, str]]
) -> None:
    peer = cli.start("heartbeat", "skewlive", "peer-p", "--interval", "200ms", *bus_args,
                     env=skewed_env(SKEW_S))
    beat = until_beating(client, namespace, "skewlive", "peer-p", peer)
    assert abs(server_ms(client) - beat) < 5000, "beat not in server time"

    result = cli.run("wait", "skewlive", "waiter-w", "ch", "--watch", "peer-p", "--dead-after",
                     "1s", "--heartbeat-interval", "200ms", "--timeout", "2s", *bus_args,
                     env=skewed_env(-SKEW_S))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "timed out" in one_line_message(result.stderr)
    assert peer.poll() is None, "the peer stopped beating: the test proves nothing"
    assert row_of(cli, bus_args, "skewlive", "waiter-w")["state"] == "timed_out"
    # The peer kept beating throughout, in server time.
    latest = alive_score(client, namespace, "skewlive", "peer-p")
    assert latest is not None
    assert latest > beat
    assert abs(server_ms(client) - latest) < 5000
