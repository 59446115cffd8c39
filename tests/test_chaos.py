"""Chaos (plan 5.4, tests 1 and 2, CI-sized): kill -9 coordinators and the server mid-flow.

Eight coordinators run as real OS processes, each looping ``wait_for`` on one channel and
appending every signal it receives to a log of its own (one ``write`` per line, so what a
coordinator received survives its death). The test publishes signals at a steady pace while it
kills random coordinators (``SIGKILL``, then a restart under the same id) and, a few times, the
server itself (``SIGKILL``, then a restart on the same port from its ``appendfsync always`` AOF).

Then a sentinel signal is published and every coordinator is kept alive until it has logged the
sentinel: each coordinator reads its own group in stream order (its pending entries first), so by
then every earlier signal was delivered to it.

The honest semantics, measured rather than assumed: ``wait_for`` acknowledges a signal before it
returns it, so a coordinator killed between the ACK and its own log write loses the signal from
its log while Redis records the ACK ("acked, not logged"); a coordinator killed after delivery but
before the ACK gets the signal again from its PEL after the restart. What must never happen: a
signal whose publish returned, neither acknowledged by nor delivered to some coordinator (lost);
nor a signal acknowledged for a coordinator whose process lived on and went past it without
``wait_for`` ever returning it (skipped: e.g. the reply of the ``receive`` script lost with a
server killed just after running it). Server kills are timed just after a publish returns, while
the coordinators are acknowledging, to open that window on purpose.

``STREAMBUS_CHAOS_SEED`` replays a schedule of chaos events (the timing still varies).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import anyio
import pytest

import streambus
from streambus.bus import Bus, Published
from streambus.errors import BusUnavailable
from streambus.schema import stream_id_ms
from tests.helpers import until_states
from tests.servers import ServerProcess

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SWARM = "chaos"
CHANNEL = "ch"
COORDINATORS = [f"c{i}" for i in range(8)]
SIGNALS = 40
PUBLISH_PACE_S = 0.15
SERVER_RESTARTS = 5
SENTINEL = "sig-end"
DRAIN_LIMIT_S = 15.0
START_LIMIT_S = 15.0
CLOCK_SLACK_S = 0.005
"""Ack ids carry the server's ms clock, the fleet's records the local one (same host)."""

WORKER = '''\
"""A chaos coordinator: wait for signals forever; log each one received, then wait again."""
import os
import sys
import time

import anyio

import streambus
from streambus.errors import BusUnavailable, WaitTimeout

URL, NAMESPACE, SWARM, COORDINATOR, CHANNEL, LOG = sys.argv[1:7]
PARENT = os.getppid()
FD = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def note(*words):
    # One write(2) per line on an O_APPEND file: a SIGKILL leaves whole lines or none.
    line = " ".join(map(str, (*words, os.getpid(), f"{time.time():.6f}")))
    os.write(FD, (line + "\\n").encode())


async def orphan_guard():
    while os.getppid() == PARENT:  # the test kills us at teardown; never outlive it
        await anyio.sleep(0.5)
    os._exit(3)


async def serve():
    while True:
        try:
            async with streambus.connect(URL, namespace=NAMESPACE, block_ms=500) as bus:
                while True:
                    try:
                        got = await bus.wait_for(SWARM, COORDINATOR, CHANNEL, timeout=20)
                    except WaitTimeout:
                        note("timeout")
                        continue
                    except BusUnavailable:
                        note("unavailable")
                        continue
                    note("recv", got.signal.signal_id, got.stream_id, got.ack_id)
        except BusUnavailable:
            note("unreachable")  # connect() found no server: it is being restarted
            await anyio.sleep(0.05)


async def main():
    note("start")
    async with anyio.create_task_group() as tg:
        tg.start_soon(orphan_guard)
        await serve()


anyio.run(main)
'''


@dataclass(frozen=True, slots=True)
class LogLine:
    kind: str
    words: tuple[str, ...]
    pid: int
    at: float


def read_log(path: Path) -> list[LogLine]:
    if not path.exists():
        return []
    lines = []
    for text in path.read_text().splitlines():
        kind, *words, pid, at = text.split()
        lines.append(LogLine(kind, tuple(words), int(pid), float(at)))
    return lines


@dataclass
class Life:
    """One incarnation (OS process) of a coordinator."""

    coordinator: str
    process: subprocess.Popen[bytes]
    started: float
    ended: float | None = None
    fate: str = "running"
    born: float | None = None
    """When its own code first ran (its ``start`` line): it can act on the bus only after."""

    def covers(self, t: float) -> bool:
        """Whether this incarnation could have acted on the bus at ``t``.

        From its ``start`` line, not from when it was spawned: a coordinator killed a few ms
        after an ACK and restarted at once would otherwise have the ACK pinned on its
        successor (which was still starting Python), and an honest "killed between its ACK and
        its log write" would read as a skipped signal (issue 11: the rare skip was this).
        """
        if self.born is None:
            return False  # killed before its code ran: it never touched the bus
        return (self.born - CLOCK_SLACK_S <= t
                and (self.ended is None or t <= self.ended + CLOCK_SLACK_S))


@dataclass
class Fleet:
    """The coordinator processes: started, killed -9, restarted; all reaped at the end."""

    script: Path
    url: str
    namespace: str
    directory: Path
    lives: list[Life] = field(default_factory=list)
    current: dict[str, Life] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def log(self, coordinator: str) -> Path:
        return self.directory / f"{coordinator}.log"

    def start(self, coordinator: str) -> None:
        with (self.directory / f"{coordinator}.stderr").open("ab") as err:
            started = time.time()
            process = subprocess.Popen(
                [sys.executable, str(self.script), self.url, self.namespace, SWARM, coordinator,
                 CHANNEL, str(self.log(coordinator))],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=self.env)
        life = Life(coordinator, process, started)
        self.lives.append(life)
        self.current[coordinator] = life

    def _end(self, life: Life, fate: str) -> None:
        life.process.wait()
        life.ended = time.time()
        life.fate = fate

    def kill(self, coordinator: str) -> None:
        """SIGKILL the coordinator's process (as a crash or the OOM killer would)."""
        life = self.current[coordinator]
        if (code := life.process.poll()) is not None:
            self._end(life, f"crashed rc={code}")
            return
        life.process.kill()
        self._end(life, "killed")

    def revive_dead(self) -> None:
        """Restart every coordinator whose process exited on its own (a crash: recorded)."""
        for coordinator, life in list(self.current.items()):
            if life.ended is None and (code := life.process.poll()) is not None:
                self._end(life, f"crashed rc={code}")
                self.start(coordinator)

    def close(self) -> None:
        for life in self.current.values():
            if life.ended is None:
                life.process.kill()
                self._end(life, "stopped")

    @property
    def crashes(self) -> list[Life]:
        return [life for life in self.lives if life.fate.startswith("crashed")]

    def kills(self, coordinator: str) -> int:
        return sum(1 for life in self.lives
                   if life.coordinator == coordinator and life.fate == "killed")

    def life_at(self, coordinator: str, t: float) -> Life | None:
        """The incarnation of ``coordinator`` that was running at time ``t`` (the latest)."""
        candidates = [life for life in self.lives
                      if life.coordinator == coordinator and life.covers(t)]
        return max(candidates, key=lambda life: life.started, default=None)

    def have_all_logged(self, signal_id: str) -> bool:
        return all(any(line.kind == "recv" and line.words[0] == signal_id
                       for line in read_log(self.log(c))) for c in COORDINATORS)


@pytest.fixture
def fleet(own_server: ServerProcess, namespace: str, tmp_path: Path) -> Iterator[Fleet]:
    script = tmp_path / "chaos_worker.py"
    script.write_text(WORKER)
    directory = tmp_path / "coordinators"
    directory.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMBUS_")}
    env["STREAMBUS_HOME"] = str(tmp_path / "streambus-home")  # never the user's embedded server
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                      env.get("PYTHONPATH")]))
    running = Fleet(script, own_server.url, namespace, directory, env=env)
    try:
        for coordinator in COORDINATORS:
            running.start(coordinator)
        yield running
    finally:
        running.close()


@dataclass
class Tally:
    publish_retries: int = 0
    publish_duplicates: int = 0
    coordinator_kills: int = 0
    server_restarts: int = 0
    server_kills: list[float] = field(default_factory=list)  # wall-clock times
    outage_s: float = 0.0


async def publish_once(bus: Bus, signal_id: str, n: int, tally: Tally) -> Published:
    """Publish until the server answers; the signal id makes a retried publish idempotent."""
    with anyio.fail_after(30):
        while True:
            try:
                published = await bus.publish(SWARM, CHANNEL, {"n": n}, sender="chaos",
                                              signal_id=signal_id)
            except BusUnavailable:
                tally.publish_retries += 1
                await anyio.sleep(0.05)
                continue
            tally.publish_duplicates += published.duplicate
            return published


class Progress:
    """The publisher's progress, for the chaos thread to time server kills against."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.published = 0
        self.done = False

    def advance(self, *, done: bool = False) -> None:
        with self._changed:
            self.published += not done
            self.done = self.done or done
            self._changed.notify_all()

    def next_publish(self, timeout: float) -> None:
        """Block until the next publish returns (or publishing ends, or ``timeout``)."""
        with self._changed:
            seen = self.published
            self._changed.wait_for(lambda: self.published > seen or self.done, timeout)


def run_chaos(fleet: Fleet, server: ServerProcess, rng: random.Random, progress: Progress,
              tally: Tally) -> None:
    """Kill -9 coordinators (restarting each) and, at scheduled moments, the server.

    A server kill lands 0-8 ms after a publish returns: while the coordinators are busy
    receiving and acknowledging that signal, the window where a lost reply matters most.
    """
    expected_s = SIGNALS * PUBLISH_PACE_S
    server_at = sorted(rng.uniform(0.1, 0.85) * expected_s for _ in range(SERVER_RESTARTS))
    started = time.monotonic()
    while not progress.done or tally.server_restarts < SERVER_RESTARTS:
        due = tally.server_restarts < SERVER_RESTARTS and (
            time.monotonic() - started >= server_at[tally.server_restarts])
        if due:
            progress.next_publish(timeout=2 * PUBLISH_PACE_S)
            time.sleep(rng.uniform(0.0, 0.008))
            down = time.monotonic()
            tally.server_kills.append(time.time())
            server.kill()
            time.sleep(rng.uniform(0.05, 0.4))  # the outage itself: part of the workload
            server.start()  # same port, same append-only file; returns once it answers
            tally.outage_s += time.monotonic() - down
            tally.server_restarts += 1
        else:
            victim = rng.choice(COORDINATORS)
            fleet.kill(victim)
            tally.coordinator_kills += 1
            time.sleep(rng.uniform(0.0, 0.15))
            fleet.start(victim)
        fleet.revive_dead()
        time.sleep(rng.uniform(0.05, 0.25))


def drain(fleet: Fleet) -> bool:
    """Keep every coordinator running until each has logged the sentinel (bounded)."""
    deadline = time.monotonic() + DRAIN_LIMIT_S
    while time.monotonic() < deadline:
        fleet.revive_dead()
        if fleet.have_all_logged(SENTINEL):
            return True
        time.sleep(0.05)
    return False


@dataclass
class Audit:
    rows: list[str] = field(default_factory=list)
    lost: list[tuple[str, str]] = field(default_factory=list)
    stuck: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[dict[str, object]] = field(default_factory=list)
    ambiguous: list[dict[str, object]] = field(default_factory=list)
    wrong_ids: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    acks_missing: int = 0


async def audit_logs(bus: Bus, fleet: Fleet, published: dict[str, Published], tally: Tally
                     ) -> Audit:
    """Hold each coordinator's log against what Redis recorded; classify every gap.

    A signal missing from a log is *lost* if the coordinator never acknowledged it and it is
    not in its PEL; *stuck* if it is in its PEL, unacknowledged. If acknowledged, the
    incarnation running at the ACK tells why: killed by the test before it logged anything
    more, it died between the ACK and its write (the honest window); alive and logging later
    signals, the signal was acknowledged for it yet never returned by ``wait_for`` (skipped).
    A server kill between the ACK and that incarnation's death makes the case ambiguous.
    """
    keys = bus.keys(SWARM)
    stream = keys.channel(CHANNEL)
    acked_by = {sid: (await bus._store.acks_snapshot(keys, sid))[1] for sid in published}
    for c in COORDINATORS:
        born: dict[int, float] = {}
        for line in read_log(fleet.log(c)):
            born.setdefault(line.pid, line.at)
        for life in fleet.lives:
            if life.coordinator == c:
                life.born = born.get(life.process.pid)
    audit = Audit(acks_missing=sum(1 for sid in published for c in COORDINATORS
                                   if c not in acked_by[sid]))
    for c in COORDINATORS:
        recv = [line for line in read_log(fleet.log(c))
                if line.kind == "recv" and line.words[0] != SENTINEL]
        counts = Counter(line.words[0] for line in recv)
        audit.wrong_ids += [(c, line.words) for line in recv
                            if line.words[0] not in published
                            or line.words[1] != published[line.words[0]].stream_id]
        by_kill: list[int] = []  # per signal: ms from its ACK to the kill
        skipped = ambiguous = 0
        for sid in (sid for sid in published if sid not in counts):
            if c not in acked_by[sid]:
                pending = await bus._store.delivery_counts(stream, c, c,
                                                          [published[sid].stream_id])
                (audit.stuck if pending else audit.lost).append((c, sid))
                continue
            ack_at = stream_id_ms(acked_by[sid][c]) / 1000
            life = fleet.life_at(c, ack_at)
            later = life is not None and any(
                line.pid == life.process.pid and line.at > ack_at + CLOCK_SLACK_S
                for line in recv)
            died = life.ended if life is not None and life.fate == "killed" else None
            server_kill_ms = min((round((k - ack_at) * 1000) for k in tally.server_kills
                                  if k >= ack_at), default=None)
            case = {"coordinator": c, "signal": sid, "ack_id": acked_by[sid][c],
                    "incarnation": f"pid {life.process.pid} {life.fate}" if life else None,
                    "logged_later_signals": later, "server_killed_ms_after_ack": server_kill_ms}
            if died is None or later:
                audit.skipped.append(case)
                skipped += 1
            elif server_kill_ms is not None and ack_at + server_kill_ms / 1000 <= died:
                audit.ambiguous.append(case)
                ambiguous += 1
            else:
                by_kill.append(round((died - ack_at) * 1000))
        audit.rows.append(
            f"{c}: received {len(counts)}/{len(published)} "
            f"log-duplicates {sum(n - 1 for n in counts.values())} "
            f"acked-not-logged {len(by_kill)} (killed {by_kill} ms after the ACK) "
            f"acked-but-skipped {skipped} ambiguous {ambiguous} kills {fleet.kills(c)}")
    return audit


async def test_signals_survive_killed_coordinators_and_server_restarts(
    own_server: ServerProcess, namespace: str, fleet: Fleet
) -> None:
    seed = int(os.environ.get("STREAMBUS_CHAOS_SEED") or random.randrange(2**32))
    print(f"\nchaos seed={seed} (replay: STREAMBUS_CHAOS_SEED={seed})")
    rng = random.Random(seed)
    tally = Tally()
    began = time.monotonic()

    async with streambus.connect(own_server.url, namespace=namespace,
                                 publish_retry_budget_s=2.0) as bus:
        await until_states(bus, SWARM, dict.fromkeys(COORDINATORS, "waiting"),
                           timeout=START_LIMIT_S)

        # -- the workload, under chaos --------------------------------------------------------
        published: dict[str, Published] = {}
        progress = Progress()
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(anyio.to_thread.run_sync, run_chaos, fleet, own_server, rng,
                                  progress, tally))
            try:
                for n in range(SIGNALS):
                    signal_id = f"sig-{n}"
                    published[signal_id] = await publish_once(bus, signal_id, n, tally)
                    progress.advance()
                    await anyio.sleep(PUBLISH_PACE_S)  # the pace of the workload
            finally:
                progress.advance(done=True)  # the chaos then ends, with the server up
        chaos_s = time.monotonic() - began

        # -- drain: the sentinel follows every signal in each coordinator's group --------------
        await publish_once(bus, SENTINEL, -1, tally)
        drain_began = time.monotonic()
        drained = await anyio.to_thread.run_sync(drain, fleet)
        drain_s = time.monotonic() - drain_began
        await anyio.to_thread.run_sync(fleet.close)

        audit = await audit_logs(bus, fleet, published, tally)

    total_s = time.monotonic() - began
    print(f"published={len(published)} publish-duplicates={tally.publish_duplicates} "
          f"publish-retries={tally.publish_retries} coordinator-kills={tally.coordinator_kills} "
          f"server-restarts={tally.server_restarts} (outage {tally.outage_s:.2f} s) "
          f"crashes={len(fleet.crashes)} chaos={chaos_s:.1f} s drain={drain_s:.1f} s "
          f"total={total_s:.1f} s")
    for row in audit.rows:
        print("  " + row)
    print(f"lost={len(audit.lost)} stuck-in-pel={len(audit.stuck)} "
          f"acked-but-skipped={len(audit.skipped)} ambiguous={len(audit.ambiguous)} "
          f"acks-missing={audit.acks_missing} wrong-ids={len(audit.wrong_ids)}")

    assert drained, f"not every coordinator received the sentinel within {DRAIN_LIMIT_S} s"
    assert audit.lost == [], f"published, never acknowledged nor delivered: {audit.lost}"
    assert audit.stuck == [], f"delivered, never acknowledged (left in the PEL): {audit.stuck}"
    assert audit.skipped == [], (
        "ACK recorded, yet the coordinator's wait_for never returned the signal and went on "
        f"to later ones (a lost reply of the receive script?): {audit.skipped}")
    assert audit.wrong_ids == [], f"received ids never published as such: {audit.wrong_ids}"
    assert fleet.crashes == [], [
        (life.coordinator, life.fate, (fleet.directory / f"{life.coordinator}.stderr")
         .read_text()[-2000:]) for life in fleet.crashes]


def test_an_ack_just_before_a_kill_belongs_to_the_killed_incarnation() -> None:
    """The rare "acked-but-skipped" of issue 11, replayed: a coordinator is killed 1 ms after
    an ACK and restarted at once. Its successor was spawned within the clock slack of that ACK
    but ran no code before it, so the ACK is the killed one's (died before its log write), not
    a signal the successor skipped."""
    fleet = Fleet(Path("worker.py"), "redis://unused", "ns", Path("."))
    killed = Life("c0", subprocess.Popen([sys.executable, "-c", ""]), started=9.0, ended=10.000,
                  fate="killed", born=9.2)
    successor = Life("c0", subprocess.Popen([sys.executable, "-c", ""]), started=10.001,
                     born=10.150)
    for life in (killed, successor):
        life.process.wait()
    fleet.lives += [killed, successor]
    assert fleet.life_at("c0", 9.999) is killed
    assert fleet.life_at("c0", 10.2) is successor
    never_ran = Life("c0", successor.process, started=10.3, ended=10.31, fate="killed")
    fleet.lives.append(never_ran)
    assert fleet.life_at("c0", 10.305) is successor  # a life killed before it ran acts never
