"""The ``streambus`` command line: a thin layer over the library for shell-driven agents.

Exit codes: 0 done, 1 unexpected error, 2 timeout (wait deadline or ACK timeout), 3 a watched
peer is dead, 4 the bus cannot be reached, 5 a retry backlog is full, 64 invalid input
(nothing was written), 77 not permitted (authentication failed, or the server's ACL refused a
command or key), 128+N ended by signal N (the wait is recorded as cancelled).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import anyio
import msgspec

from streambus.cli import _lean  # noqa: F401  (first: it imports the Redis client lean)

# isort: split
from streambus.acl import acl_rules
from streambus.bus import Bus, connect
from streambus.cli.parser import UsageError, build_parser
from streambus.config import Settings
from streambus.errors import (
    AckTimeout,
    InvalidInput,
    StreambusError,
)
from streambus.keys import SwarmKeys, validate_id
from streambus.liveness import Liveness
from streambus.logs import configure_logging, resolve_log_format
from streambus.process import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    exit_code_of,
    run_interruptible,
)

__all__ = ["build_parser", "main"]

T = TypeVar("T")



def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code."""
    try:
        args = build_parser().parse_args(argv)
        _validate(args)
        log_format = resolve_log_format(args.log_format)
    except (UsageError, InvalidInput) as exc:
        print(_one_line(str(exc)), file=sys.stderr)
        return EXIT_USAGE
    # Without -v the CLI's stderr is its one-line verdict; the library's logs (transitions,
    # reconnect attempts) are for -v.
    configure_logging(log_format, logging.INFO if args.verbose else logging.CRITICAL)
    try:
        if args.command == "server":
            return _server(args)
        if args.command == "acl":
            print(acl_rules(args.role, Settings.resolve(None, args.namespace).namespace,
                            args.swarm))
            return EXIT_OK
        return anyio.run(_run_with_signals, _COMMANDS[args.command], args)
    except StreambusError as exc:
        code = exit_code_of(exc)
        prefix = "bus unavailable: " if code == EXIT_UNAVAILABLE else ""
        print(_one_line(f"streambus: {prefix}{exc}"), file=sys.stderr)
        return code
    except _Signalled as exc:
        if args.command in ("heartbeat", "watchdog", "traces", "metrics", "dashboard"):
            return EXIT_OK  # a signal is how a heartbeat is meant to stop
        print(f"streambus: stopped by signal {exc.signum}", file=sys.stderr)
        return 128 + exc.signum
    except Exception as exc:  # a bug of ours: still one line, the traceback only with -v
        logging.getLogger("streambus").debug("unexpected error", exc_info=True)
        cause = exc.exceptions[0] if isinstance(exc, BaseExceptionGroup) else exc
        print(f"streambus: unexpected error: {cause!r} (run with -v for the traceback)",
              file=sys.stderr)
        return EXIT_ERROR


def _one_line(message: str) -> str:
    """A verdict stays one line even when it quotes input holding line breaks."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def _validate(args: argparse.Namespace) -> None:
    """Check every id before anything connects, so invalid input writes nothing."""
    settings = Settings.resolve(args.redis_url, args.namespace)
    # ``is not None``, not truthiness: an empty id ("$UNSET_VAR") is invalid, not "not given".
    if (swarm := getattr(args, "swarm", None)) is not None:  # cleanup's --swarm too
        keys = SwarmKeys.for_swarm(settings.namespace, swarm)
        if (channel := getattr(args, "channel", None)) is not None:
            keys.channel(channel)
    for name in ("coordinator", "sender", "signal_id"):
        if (value := getattr(args, name, None)) is not None:
            validate_id(value, name.replace("_", " "))
    for coordinator in getattr(args, "await_ack", []):
        validate_id(coordinator, "coordinator id")
    if args.command == "signal" and args.require_signed and not args.await_ack:
        raise InvalidInput("--require-signed checks ACKs: name the coordinators with --await-ack")
    for peer in getattr(args, "watch", []):
        validate_id(peer, "peer id")
    for swarm in getattr(args, "swarms", []):
        SwarmKeys.for_swarm(settings.namespace, swarm)
    if (request_id := getattr(args, "request_id", None)) is not None:
        validate_id(request_id, "request id")
    for name in ("interval", "heartbeat_interval", "dead_after"):
        if (value := getattr(args, name, None)) is not None and value <= 0:
            raise InvalidInput(f"--{name.replace('_', '-')} must be positive")
    for name in ("timeout", "ack_timeout", "reconnect_budget", "wait", "settle"):
        if (value := getattr(args, name, None)) is not None and value < 0:
            raise InvalidInput(f"--{name.replace('_', '-')} must not be negative")


class _Signalled(Exception):
    def __init__(self, signum: int) -> None:
        self.signum = signum


Command = Callable[[Bus, argparse.Namespace], Awaitable[int]]


async def _run_with_signals(command: Command, args: argparse.Namespace) -> int:
    """Run ``command`` on a connected bus; SIGINT/SIGTERM end it as :class:`_Signalled`."""
    async with connect(args.redis_url, namespace=args.namespace) as bus:
        outcome = await run_interruptible(lambda: command(bus, args))
    if outcome.signum is not None:
        raise _Signalled(outcome.signum)
    return EXIT_ERROR if outcome.result is None else outcome.result


def _print(obj: Any) -> None:
    sys.stdout.write(msgspec.json.encode(obj).decode() + "\n")
    sys.stdout.flush()


async def _signal(bus: Bus, args: argparse.Namespace) -> int:
    try:
        published = await bus.publish(
            args.swarm, args.channel, args.payload, sender=args.sender or "",
            signal_id=args.signal_id, await_acks=args.await_ack, ack_timeout=args.ack_timeout,
            durability=args.durability, require_signed=args.require_signed,
        )
    except AckTimeout as exc:
        rejected = {"rejected_acks": exc.rejected} if exc.rejected else {}
        _print({**exc.published.as_dict(), "error": "ack_timeout", **rejected})
        print(f"streambus: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    _print(published.as_dict())
    return EXIT_OK


async def _wait(bus: Bus, args: argparse.Namespace) -> int:
    liveness = None
    if args.heartbeat_interval is not None or args.watch:
        liveness = Liveness(heartbeat_interval=args.heartbeat_interval or 5.0,
                            dead_after=args.dead_after)
    hooks = None
    if args.hooks is not None:
        from streambus.hooks import Hooks

        hooks = Hooks.from_profile(args.hooks, args.agent_type, agent=args.coordinator)
    coordinator = bus.coordinator(args.swarm, args.coordinator, liveness=liveness, hooks=hooks)
    delivery = await coordinator.wait_for(
        args.channel, timeout=args.timeout, iteration=args.iteration, watch=args.watch,
        reconnect_budget=args.reconnect_budget, require_signed=args.require_signed)
    _print(delivery.as_dict())
    return EXIT_OK


async def _heartbeat(bus: Bus, args: argparse.Namespace) -> int:
    coordinator = bus.coordinator(args.swarm, args.coordinator)
    async with coordinator.heartbeating(args.interval):
        await anyio.sleep_forever()
    return EXIT_OK  # pragma: no cover - only a signal ends it


async def _cleanup(bus: Bus, args: argparse.Namespace) -> int:
    from streambus.cleanup import append_log_async, cleanup
    from streambus.server import state_dir

    report = await cleanup(bus, swarm=args.swarm, stale_after=args.stale_after,
                           dry_run=args.dry_run)
    log_file = Path(args.log_file) if args.log_file else state_dir() / "logs" / "cleanup.log"
    await append_log_async(log_file, report)
    if args.json:
        _print(report.as_dict())
        return EXIT_OK
    verb = "would remove" if args.dry_run else "removed"
    for swarm in report.swarms:
        if swarm.removed:
            print(f"swarm {swarm.swarm}: {verb} {len(swarm.removed)} stale coordinators "
                  f"({swarm.groups_destroyed} consumer groups, {swarm.retry_streams_removed} "
                  f"retry streams): {', '.join(swarm.removed[:10])}"
                  f"{' ...' if len(swarm.removed) > 10 else ''}")
    print(f"{verb} {report.removed} stale coordinators in {len(report.swarms)} swarms "
          f"in {report.elapsed_s:.3f} s")
    return EXIT_OK


async def _watchdog(bus: Bus, args: argparse.Namespace) -> int:
    from consumers.watchdog import Watchdog

    await Watchdog(bus, args.swarm, dead_after=args.dead_after, interval=args.interval).run()
    return EXIT_OK  # pragma: no cover - only a signal ends it


async def _metrics(bus: Bus, args: argparse.Namespace) -> int:
    from consumers.metrics import serve

    await serve(bus, args.swarms, host=args.host, port=args.port)
    return EXIT_OK  # pragma: no cover - only a signal ends it


async def _dashboard(bus: Bus, args: argparse.Namespace) -> int:
    import threading
    import webbrowser

    try:
        from streambus.dashboard import DashboardOptions, serve
    except ImportError as exc:  # the optional deps are missing
        print(f"streambus: the dashboard needs its extra: pip install 'streambus[dashboard]' "
              f"({exc})", file=sys.stderr)
        return EXIT_ERROR

    def ready(url: str) -> None:
        mode = "actions allowed" if args.allow_actions else "read-only"
        print(f"streambus dashboard at {url} ({mode}); Ctrl-C stops it", flush=True)
        if args.open:
            threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()

    await serve(bus, DashboardOptions(dead_after=args.dead_after,
                                      allow_actions=args.allow_actions),
                host=args.host, port=args.port, on_ready=ready)
    return EXIT_OK  # pragma: no cover - only a signal ends it


async def _traces(bus: Bus, args: argparse.Namespace) -> int:
    from consumers.traces import run_traces

    await run_traces(bus, args.swarm, settle=args.settle, lease_ttl=args.lease_ttl)
    return EXIT_OK  # pragma: no cover - only a signal ends it


async def _retry(bus: Bus, args: argparse.Namespace) -> int:
    sent = await bus.request_retry(
        args.swarm, args.coordinator, reason=args.reason, blockers=args.blockers,
        payload=args.payload, requested_by=args.requested_by, request_id=args.request_id,
        backlog_limit=args.backlog_limit, wait=args.wait)
    _print({"request_id": sent.request_id, "stream_id": sent.stream_id,
            "duplicate": sent.duplicate})
    return EXIT_OK


async def _status(bus: Bus, args: argparse.Namespace) -> int:
    if args.swarm is None:
        return await _status_all(bus, args)
    rows = await bus.status(args.swarm)
    if args.json:
        _print({"swarm": args.swarm, "coordinators": [row.as_dict() for row in rows]})
        return EXIT_OK
    if not rows:
        print(f"swarm {args.swarm}: no coordinators")
        return EXIT_OK
    print(f"{'COORDINATOR':24} {'STATE':12} {'CHANNEL':24} {'ITER':>4} {'REMAINING':>10}")
    for row in rows:
        remaining = f"{row.remaining_s:.1f}s" if row.remaining_s is not None else "-"
        print(f"{row.coordinator:24} {row.state:12} {row.channel or '-':24} "
              f"{row.iteration or 0:>4} {remaining:>10}")
    return EXIT_OK


async def _status_all(bus: Bus, args: argparse.Namespace) -> int:
    summaries = await bus.swarms(dead_after=args.dead_after)
    if args.json:
        _print({"swarms": [msgspec.structs.asdict(s) for s in summaries]})
        return EXIT_OK
    if not summaries:
        print(f"namespace {bus.namespace}: no swarms")
        return EXIT_OK
    print(f"{'SWARM':24} {'COORD':>6} {'WAITING':>8} {'SIGNALED':>9} {'TIMED_OUT':>10} "
          f"{'DEAD':>5} {'DEAD_LETTERS':>13} {'OLDEST_WAIT':>12}")
    for s in summaries:
        oldest = f"{s.oldest_wait_s:.1f}s" if s.oldest_wait_s is not None else "-"
        print(f"{s.swarm:24} {s.coordinators:>6} {s.waiting:>8} {s.signaled:>9} "
              f"{s.timed_out:>10} {s.dead:>5} {s.dead_letters:>13} {oldest:>12}")
    return EXIT_OK


async def _demo(bus: Bus, args: argparse.Namespace) -> int:
    from streambus.cfn.demo import DemoOptions, run_demo

    return await run_demo(bus, DemoOptions(
        scenario=args.scenario, coordinators=args.coordinators, validators=args.validators,
        seed=args.seed, timeout=args.timeout, pace=args.pace, json=args.json))


def _server(args: argparse.Namespace) -> int:
    from streambus.server import ServerInfo, run_foreground, state_dir, stop_server

    if args.stop:
        info = stop_server()
        print(f"stopped embedded server {info.url_redacted} (pid {info.pid})" if info
              else "no embedded server recorded")
        return EXIT_OK
    def ready(info: ServerInfo) -> None:
        print(f"embedded server listening on {info.url_redacted} (pid {info.pid}, "
              f"data in {state_dir()}); Ctrl-C stops it", flush=True)

    return run_foreground(port=args.port, on_ready=ready)


_COMMANDS: Final[dict[str, Command]] = {
    "traces": _traces,
    "metrics": _metrics, "dashboard": _dashboard,
    "signal": _signal, "wait": _wait, "status": _status, "demo": _demo,
    "heartbeat": _heartbeat, "retry": _retry, "watchdog": _watchdog, "cleanup": _cleanup,
}

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
