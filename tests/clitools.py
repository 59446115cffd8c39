"""Running the ``streambus`` CLI as real processes in tests, and reading what it prints."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import redis

from streambus.server import read_info, stop_server

PROCESS_TIMEOUT_S = 20.0
STREAM_ID = re.compile(r"\d+-\d+")
UNREACHABLE_URL = "redis://127.0.0.1:1"


class Cli:
    """Runs ``python -m streambus`` with a clean environment; kills what it started, at the end."""

    def __init__(self, home: Path) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMBUS_")}
        # If a bug made the CLI fall back to the embedded server, it starts in a throwaway home
        # (and is stopped at teardown) rather than in the user's real one.
        self.env["STREAMBUS_HOME"] = str(home)
        self.home = home
        self.started: list[subprocess.Popen[str]] = []

    def _env(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        return self.env | dict(extra or {})

    def run(self, *args: str, env: Mapping[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "streambus", *args], env=self._env(env),
            capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S, check=False,
        )

    def start(self, *args: str, env: Mapping[str, str] | None = None
              ) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "streambus", *args], env=self._env(env),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.started.append(process)
        return process

    def close(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=PROCESS_TIMEOUT_S)
        if read_info(self.home) is not None:
            stop_server(self.home)


def one_json_object(stdout: str) -> dict[str, Any]:
    lines = stdout.splitlines()
    assert len(lines) == 1, f"expected one line of JSON, got {stdout!r}"
    obj = json.loads(lines[0])
    assert isinstance(obj, dict)
    return obj


def one_line_message(stderr: str) -> str:
    assert "Traceback" not in stderr
    message = stderr.strip()
    assert message, "expected a message on stderr"
    assert "\n" not in message, f"expected one line on stderr, got {stderr!r}"
    return message


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=PROCESS_TIMEOUT_S)
    return process.returncode, out, err


def namespace_keys(redis_url: str, namespace: str) -> list[bytes]:
    client = redis.Redis.from_url(redis_url)
    try:
        return list(client.keys(f"{namespace}:*"))
    finally:
        client.close()


def status(cli: Cli, bus_args: list[str], swarm: str) -> dict[str, Any]:
    result = cli.run("status", swarm, "--json", *bus_args)
    assert result.returncode == 0, result.stderr
    return one_json_object(result.stdout)


def states(cli: Cli, bus_args: list[str], swarm: str) -> dict[str, str]:
    return {row["coordinator"]: row["state"]
            for row in status(cli, bus_args, swarm)["coordinators"]}


def until_states(cli: Cli, bus_args: list[str], swarm: str, want: dict[str, str],
                 watching: list[subprocess.Popen[str]], timeout: float = 10.0) -> None:
    """Poll ``status --json`` (bounded) until the recorded states include ``want``."""
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    while time.monotonic() < deadline:
        for process in watching:
            if process.poll() is not None:
                code, out, err = finish(process)
                pytest.fail(f"{process.args} exited {code} early: {out!r} {err!r}")
        seen = states(cli, bus_args, swarm)
        if all(seen.get(k) == v for k, v in want.items()):
            return
        time.sleep(0.02)
    pytest.fail(f"states never became {want}; last seen {seen}")
