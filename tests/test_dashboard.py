"""``streambus dashboard`` over HTTP, against real servers: pages, the live feed, bad input,
Redis going away, the shared poller, actions, and the CLI process.

The browser's side (what a person sees) is in ``test_dashboard_browser.py``.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import anyio
import httpx
import msgspec
import pytest

import streambus
from streambus.bus import Bus
from streambus.dashboard import DashboardOptions
from streambus.schema import RetryRequest, decode_fields, encode
from tests.clitools import PROCESS_TIMEOUT_S, Cli, finish
from tests.dashboard_tools import FAST, feed, rows, running_dashboard
from tests.helpers import until_states
from tests.servers import ServerProcess

pytestmark = pytest.mark.anyio


async def test_pages_and_their_assets(bus: Bus) -> None:
    async with running_dashboard(bus) as (url, _), httpx.AsyncClient(base_url=url) as client:
        page = await client.get("/")
        assert page.status_code == 200
        assert "text/html" in page.headers["content-type"]
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert bus.namespace in page.text
        for asset in ("/static/live.js", "/static/overview.js", "/static/swarm.js",
                      "/static/dashboard.css", "/static/favicon.svg"):
            assert (await client.get(asset)).status_code == 200, asset
        assert "cdn" not in page.text.lower()


async def test_overview_counts_every_swarm(bus: Bus) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: bus.wait_for("alpha", "c1", "done", timeout=30))
        await until_states(bus, "alpha", {"c1": "waiting"})
        await bus.publish("beta", "done", sender="v")
        async with running_dashboard(bus) as (url, _), httpx.AsyncClient(base_url=url) as c:
            async with feed(c, "/events") as events:
                _, data = await events.until(lambda e, d: e == "snapshot" and len(d["swarms"]) == 2)
            swarms = {s["swarm"]: s for s in data["swarms"]}
            assert swarms["alpha"]["waiting"] == 1
            assert swarms["alpha"]["oldest_wait_s"] is not None
            assert swarms["alpha"]["loop"] is None
            assert swarms["beta"]["coordinators"] == 0
            api = await c.get("/api/swarms")
            assert api.status_code == 200
            assert {s["swarm"] for s in api.json()["swarms"]} == {"alpha", "beta"}
        tg.cancel_scope.cancel()


async def test_bad_and_unknown_swarm_ids_are_4xx_pages(bus: Bus) -> None:
    await bus.publish("known", "done", sender="v")
    async with running_dashboard(bus) as (url, _), httpx.AsyncClient(base_url=url) as client:
        for path in ("/swarms/bad!id", "/swarms/%7Bslot%7D", "/swarms/x%20y",
                     "/swarms/" + "a" * 65):
            page = await client.get(path)
            assert page.status_code == 400, path
            assert "Invalid swarm id" in page.text
            assert "Traceback" not in page.text
        unknown = await client.get("/swarms/nobody")
        assert unknown.status_code == 404
        assert "Unknown swarm" in unknown.text
        assert (await client.get("/swarms/known")).status_code == 200
        assert (await client.get("/no/such/page")).status_code == 404
        assert (await client.get("/swarms/bad!id/events")).status_code == 400
        assert (await client.get("/api/swarms/bad!id")).status_code == 400
        # Bound to localhost, it answers only localhost names (no DNS rebinding).
        assert (await client.get("/", headers={"host": "evil.example"})).status_code == 400


async def test_rows_appear_change_state_and_turn_dead_live(bus: Bus) -> None:
    async with running_dashboard(bus) as (url, _), httpx.AsyncClient(base_url=url) as client, \
            anyio.create_task_group() as tg:
        coordinator = bus.coordinator("sw", "c1")
        async with coordinator.heartbeating(0.1):
            tg.start_soon(lambda: coordinator.wait_for("done", timeout=30))
            async with feed(client, "/swarms/sw/events") as events:
                _, data = await events.until(
                    lambda e, d: rows(d).get("c1", {}).get("state") == "waiting")
                row = rows(data)["c1"]
                assert row["channel"] == "done"
                assert row["dead"] is False
                assert row["remaining_s"] > 20
                await bus.publish("sw", "done", sender="v", await_acks=["c1"], ack_timeout=10)
                _, data = await events.until(
                    lambda e, d: rows(d)["c1"]["state"] == "signaled" and d["latency"])
        # heartbeats stopped: dead after 1 s of silence, without anything else happening
        async with feed(client, "/swarms/sw/events") as events:
            _, data = await events.until(lambda e, d: rows(d)["c1"]["dead"], timeout=5)
        assert data["rows"][0]["last_heartbeat_age_s"] > FAST.dead_after
        (span,) = [s for s in data["spans"] if s["coordinator"] == "c1"]
        assert span["outcome"] == "signaled"
        assert span["end_ms"] >= span["start_ms"]
        (histogram,) = data["latency"]
        assert histogram["channel"] == "done"
        assert histogram["count"] == 1
        assert sum(histogram["buckets"]) == 1


async def test_one_poller_serves_every_browser(bus: Bus) -> None:
    """Ten browsers on one swarm: one feed, one read per interval, the same snapshots."""
    await bus.publish("sw", "done", sender="v")
    async with running_dashboard(bus) as (url, hub), httpx.AsyncClient(base_url=url) as c:
        seen: list[list[int]] = []

        async def browser() -> None:
            mine: list[int] = []
            seen.append(mine)
            async with feed(c, "/swarms/sw/events") as events:
                while len(mine) < 5:
                    _, data = await events.until(lambda e, d: e == "snapshot")
                    mine.append(data["now_ms"])

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(browser)
                await anyio.wait_all_tasks_blocked()
                assert list(hub.feeds) == ["swarm:sw"]
        feed_ = hub.feeds["swarm:sw"]
        # Every snapshot any browser got was one the single poller read.
        assert len({t for mine in seen for t in mine}) <= feed_.reads
        # Browsers that leave unsubscribe (as soon as the server sees them go).
        with anyio.fail_after(5):
            while True:
                if not feed_.subscribers:
                    break
                await anyio.sleep(0.01)


async def test_redis_going_away_is_a_banner_and_recovers(own_server: ServerProcess,
                                                         namespace: str) -> None:
    async with streambus.connect(own_server.url, namespace=namespace) as bus:
        await bus.publish("sw", "done", sender="v")
        async with running_dashboard(bus) as (url, _), httpx.AsyncClient(base_url=url) as c, \
                feed(c, "/swarms/sw/events") as events:
            await events.until(lambda e, d: e == "snapshot")
            own_server.kill()
            _, data = await events.until(lambda e, d: e == "unavailable")
            assert data["message"]
            # the page itself still loads (the banner says why it is stale)
            assert (await c.get("/swarms/sw")).status_code == 200
            assert (await c.get("/api/swarms/sw")).status_code == 503
            own_server.restart()
            await events.until(lambda e, d: e == "snapshot", timeout=15)


async def _dead_letter(bus: Bus, swarm: str, fields: dict[bytes, bytes]) -> str:
    """A dead letter written as the core writes one (tests may use the store directly)."""
    keys = bus.keys(swarm)
    await bus._store.dead_letter(keys, keys.retries("c1"), "c1", ("1-1", fields),
                                 "handler failed 3 times", ack=False)
    (entry_id, _), = await bus.latest_entries(keys.dead_letters, 1)
    return entry_id


async def test_actions_need_allow_actions(bus: Bus) -> None:
    request = RetryRequest(coordinator="c1", request_id="r1", reason="flaky")
    entry_id = await _dead_letter(bus, "sw", {b"e": encode(request)})
    poison = await _dead_letter(bus, "sw", {b"e": b"{not json"})
    replay = f"/swarms/sw/dead-letters/{entry_id}/replay"
    action = {"x-streambus-action": "1"}
    async with running_dashboard(bus) as (url, _), httpx.AsyncClient(base_url=url) as c:
        async with feed(c, "/swarms/sw/events") as events:
            _, data = await events.until(lambda e, d: len(d["dead_letters"]) == 2)
        by_id = {d["id"]: d for d in data["dead_letters"]}
        assert by_id[entry_id]["reason"] == "handler failed 3 times"
        assert by_id[entry_id]["kind"] == "RetryRequest"
        assert by_id[poison]["kind"] == "undecodable"
        assert (await c.post(replay, headers=action)).status_code == 403  # read-only
    options = DashboardOptions(dead_after=1.0, interval=0.1, allow_actions=True)
    async with running_dashboard(bus, options) as (url, _), \
            httpx.AsyncClient(base_url=url) as c:
        assert (await c.post(replay)).status_code == 403  # no header: a cross-site form
        assert (await c.post(f"/swarms/sw/dead-letters/{poison}/replay",
                             headers=action)).status_code == 409
        assert (await c.post("/swarms/sw/dead-letters/9-9/replay",
                             headers=action)).status_code == 404
        done = await c.post(replay, headers=action)
        assert done.status_code == 200, done.text
        assert done.json()["request_id"] != "r1"
    (entry,) = await bus.read_entries(bus.keys("sw").retries("c1"))
    assert decode_fields(entry[1]) == msgspec.structs.replace(
        request, request_id=done.json()["request_id"], requested_by="dashboard")


def test_cli_prints_its_url_and_exits_0_on_sigterm(cli: Cli, bus_args: list[str]) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        process = cli.start("dashboard", "--port", "0", "--dead-after", "30s", *bus_args)
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("streambus dashboard at http://127.0.0.1:"), line
        url = line.split()[3]
        assert "read-only" in line
        page = httpx.get(url, timeout=PROCESS_TIMEOUT_S)
        assert page.status_code == 200
        process.send_signal(signum)
        code, _, err = finish(process)
        assert code == 0, err


def test_cli_reports_a_port_in_use(cli: Cli, bus_args: list[str]) -> None:
    first = cli.start("dashboard", "--port", "0", *bus_args)
    assert first.stdout is not None
    port = first.stdout.readline().split()[3].rsplit(":", 1)[1].strip("/")
    second = cli.run("dashboard", "--port", port, *bus_args)
    assert second.returncode == 1
    assert "cannot serve the dashboard" in second.stderr
    assert "Traceback" not in second.stderr
    first.send_signal(signal.SIGTERM)
    assert finish(first)[0] == 0


def test_one_shot_cli_does_not_import_the_web_stack() -> None:
    probe = ("import sys, streambus.cli; "
             "print(sorted(m for m in ('starlette', 'uvicorn', 'sse_starlette') "
             "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=PROCESS_TIMEOUT_S).stdout
    assert out.strip() == "[]"
