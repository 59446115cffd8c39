"""The ``streambus`` command line's arguments: every command, option and help text."""

from __future__ import annotations

import argparse
import json
from typing import Any, NoReturn

from streambus import __version__
from streambus.acl import ROLES
from streambus.config import ENV_NAMESPACE, ENV_URL, ENV_URL_FILE, parse_duration
from streambus.errors import InvalidInput
from streambus.logs import ENV_LOG_FORMAT, LOG_FORMATS


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on bad usage; 2 means timeout here, so bad usage exits 64."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid JSON payload: {exc}") from None
    except RecursionError:
        raise argparse.ArgumentTypeError("invalid JSON payload: nested too deeply") from None


def _add_common(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The options every command takes, before or after the command name.

    On subcommands they default to SUPPRESS, so an option given before the command name is not
    overwritten by the subcommand's default.
    """
    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--redis-url", default=default(None),
                        help=f"Redis/Valkey URL (env {ENV_URL}, or a file named by "
                             f"{ENV_URL_FILE}: keeps a password out of ps; default: the "
                             "embedded server)")
    parser.add_argument("--namespace", default=default(None),
                        help=f"key namespace (env {ENV_NAMESPACE}; default: streambus)")
    parser.add_argument("-v", "--verbose", action="store_true", default=default(False),
                        help="log state transitions")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=default(None),
                        help=f"log lines as text or JSON (env {ENV_LOG_FORMAT}; default text)")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    _add_common(common, defaults=False)

    parser = _Parser(prog="streambus", description="Blocking coordination on Redis Streams.")
    parser.add_argument("--version", action="version", version=f"streambus {__version__}")
    _add_common(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("signal", parents=[common], help="publish a signal on a channel")
    p.add_argument("swarm")
    p.add_argument("channel")
    p.add_argument("--sender", default=None)
    p.add_argument("--payload", type=_json, default=None, help="JSON payload")
    p.add_argument("--signal-id", default=None, help="idempotency key (default: random)")
    p.add_argument("--await-ack", action="append", default=[], metavar="COORDINATOR",
                   help="wait for this coordinator's ACK (repeatable)")
    p.add_argument("--ack-timeout", type=_duration, default=30.0)
    p.add_argument("--require-signed", action="store_true",
                   help="count only ACKs signed with the swarm's key (STREAMBUS_SIGNING_KEY or "
                        "STREAMBUS_SIGNING_KEY_FILE); others are dead-lettered and named in the "
                        "timeout error")
    p.add_argument(
        "--durability", choices=("none", "fsync", "replicated"), default="none",
        help="when to report the signal published: none (default) = in the server's memory "
             "(an AOF 'everysec' server that crashes may lose the last second); fsync = in "
             "the server's append-only file on disk (WAITAOF; Redis >= 7.2 or Valkey, else "
             "an error and nothing is published); replicated = a replica has it (WAIT 1; a "
             "failover that promotes another replica can still lose it). A level not "
             "confirmed within 1 s is an error, though the signal was appended: publishing "
             "again with the same --signal-id is safe")

    p = sub.add_parser("wait", parents=[common], help="block until a signal arrives")
    p.add_argument("swarm")
    p.add_argument("coordinator")
    p.add_argument("channel")
    p.add_argument("--timeout", type=_duration, default=30 * 60.0)
    p.add_argument("--iteration", type=int, default=0, help="iteration (default: previous + 1)")
    p.add_argument("--heartbeat-interval", type=_duration, default=None,
                   help="heartbeat while waiting, this often")
    p.add_argument("--watch", action="append", default=[], metavar="PEER",
                   help="end the wait (exit 3) if this peer's heartbeats lapse (repeatable)")
    p.add_argument("--dead-after", type=_duration, default=120.0,
                   help="a watched peer silent this long is dead (default 2m)")
    p.add_argument("--reconnect-budget", type=_duration, default=300.0,
                   help="give up (exit 4) after the bus is unreachable this long (default 5m)")
    p.add_argument("--hooks", default=None, metavar="PROFILE",
                   help="TOML profile with lifecycle hooks per agent type")
    p.add_argument("--agent-type", default="coordinator",
                   help="which agent type's hooks of the profile apply (default coordinator)")
    p.add_argument("--require-signed", action="store_true",
                   help="deliver only signals signed with the swarm's key (STREAMBUS_SIGNING_KEY "
                        "or STREAMBUS_SIGNING_KEY_FILE); others are dead-lettered and wake "
                        "nobody")

    p = sub.add_parser("heartbeat", parents=[common], help="heartbeat until SIGTERM/SIGINT")
    p.add_argument("swarm")
    p.add_argument("coordinator")
    p.add_argument("--interval", type=_duration, default=5.0)

    p = sub.add_parser("cleanup", parents=[common],
                       help="remove what stale coordinators left behind (safe from cron)")
    p.add_argument("--swarm", default=None, help="one swarm (default: every swarm)")
    p.add_argument("--stale-after", type=_duration, default=600.0,
                   help="no heartbeat/state change for this long is stale (default 10m)")
    p.add_argument("--dry-run", action="store_true", help="report, remove nothing")
    p.add_argument("--json", action="store_true")
    p.add_argument("--log-file", default=None,
                   help="append a JSON line per run (default: <state dir>/logs/cleanup.log)")

    p = sub.add_parser("watchdog", parents=[common],
                       help="report coordinators whose heartbeats lapse (CoordinatorDead events)")
    p.add_argument("swarm")
    p.add_argument("--dead-after", type=_duration, default=120.0)
    p.add_argument("--interval", type=_duration, default=5.0)

    p = sub.add_parser("metrics", parents=[common],
                       help="serve Prometheus metrics at /metrics until SIGTERM/SIGINT")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9109, help="port to listen on (default 9109)")
    p.add_argument("--swarm", action="append", default=[], dest="swarms", metavar="SWARM",
                   help="a swarm to export (repeatable; default: every swarm, found each minute)")

    p = sub.add_parser("dashboard", parents=[common],
                       help="a live web view of every swarm, until SIGTERM/SIGINT")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port to listen on (default 8765)")
    p.add_argument("--dead-after", type=_duration, default=120.0,
                   help="show a coordinator silent this long as dead (default 2m)")
    p.add_argument("--open", action="store_true", help="open it in a web browser")
    p.add_argument("--allow-actions", action="store_true",
                   help="allow actions that write (replaying a dead letter); default read-only")

    p = sub.add_parser("retry", parents=[common],
                       help="ask a coordinator to redo work (a retry request)")
    p.add_argument("swarm")
    p.add_argument("coordinator")
    p.add_argument("--reason", default="")
    p.add_argument("--blocker", action="append", default=[], dest="blockers")
    p.add_argument("--payload", type=_json, default=None, help="JSON payload")
    p.add_argument("--request-id", default=None, help="idempotency key (default: random)")
    p.add_argument("--requested-by", default="")
    p.add_argument("--backlog-limit", type=int, default=1000)
    p.add_argument("--wait", type=_duration, default=0.0,
                   help="when the backlog is full, keep trying this long (else exit 5)")

    p = sub.add_parser("status", parents=[common],
                       help="coordinators and their blocking state (no swarm: every swarm)")
    p.add_argument("swarm", nargs="?", default=None,
                   help="one swarm's coordinators (default: every swarm, with counts)")
    p.add_argument("--dead-after", type=_duration, default=120.0,
                   help="with no swarm: count a coordinator silent this long as dead "
                        "(default 2m)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("traces", parents=[common],
                       help="export signal latency spans over OTLP (until SIGTERM/SIGINT)")
    p.add_argument("swarm")
    p.add_argument("--settle", type=_duration, default=10.0,
                   help="end a signal's span after no new ACK for this long (default 10s)")
    p.add_argument("--lease-ttl", type=_duration, default=10.0,
                   help="one instance per swarm projects; another stands by and takes over "
                        "this long after the first dies (default 10s)")

    p = sub.add_parser(
        "acl", parents=[common],
        help="print the ACL rules of a role, to follow 'ACL SETUSER <name> on ><password>'")
    p.add_argument("role", choices=ROLES,
                   help="agent: wait, signal, heartbeat, retry, ACKs; observer: status and "
                        "metrics reads, read-only; projector: the consumers (metrics, traces, "
                        "watchdog); admin: all of it plus cleanup")
    p.add_argument("--swarm", default=None, help="only this swarm's keys (default: every "
                                                 "swarm of the namespace)")

    p = sub.add_parser("server", parents=[common], help="run the embedded server in the foreground")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--stop", action="store_true", help="stop the background embedded server")

    p = sub.add_parser("demo", parents=[common],
                       help="a CFN Loop epic run by real processes (the plan's scenario 1)")
    p.add_argument("--scenario", choices=("standard", "clean", "escalate"), default="standard",
                   help="standard: retry rounds; clean: none; escalate: consensus never comes")
    p.add_argument("--coordinators", type=int, default=3, help="Loop 3 coordinators (1-26)")
    p.add_argument("--validators", type=int, choices=(2, 3, 4), default=3)
    p.add_argument("--seed", type=int, default=None, help="reproduce a run (default: random)")
    p.add_argument("--timeout", type=_duration, default=60.0, help="for the whole run")
    p.add_argument("--pace", type=float, default=1.0,
                   help="scale the simulated work's durations (0: as fast as possible)")
    p.add_argument("--json", action="store_true", help="the summary as one JSON line on stdout")
    return parser
