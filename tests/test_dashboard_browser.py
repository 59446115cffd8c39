"""The dashboard in a real headless Chromium (Debian's ``/usr/bin/chromium``, driven by
Playwright's async API): what a person sees, live, without reloading the page.

Skipped with a reason where Chromium or Playwright is missing; ``STREAMBUS_REQUIRE_TOOLS=1``
(CI) turns that into a failure. Every wait is Playwright's ``expect`` with a timeout, or a
condition polled in Redis; none is a sleep.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

import streambus
from streambus.bus import Bus
from streambus.cfn.loop import EpicLoop
from tests.dashboard_tools import running_dashboard
from tests.helpers import until_states
from tests.servers import ServerProcess
from tests.tools import missing, need

pytestmark = pytest.mark.anyio
LIVE_MS = 5000
"""How long a change may take to show (the page polls every 0.1 s in these tests)."""


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    chromium = need("chromium", "the dashboard's browser tests (Debian package chromium)")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        missing("needs the Python package playwright (the dev extra)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


class Console:
    """Every error the page logged (console errors and uncaught exceptions)."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:
    """A fresh page; the test fails if it logged any error."""
    context = await browser.new_context()
    opened = await context.new_page()
    console = Console(opened)
    opened.console = console
    try:
        yield opened
    finally:
        await context.close()
    assert console.errors == []


def expect(locator: Any) -> Any:
    from playwright.async_api import expect as playwright_expect

    return playwright_expect(locator)


def row(page: Any, coordinator: str) -> Any:
    return page.locator(f'#coordinators tr[data-coordinator="{coordinator}"]')


async def mark_loaded(page: Any) -> None:
    """Tag this document, so the test can tell it was never reloaded."""
    await page.evaluate("window.__notReloaded = true")


async def assert_not_reloaded(page: Any) -> None:
    assert await page.evaluate("window.__notReloaded === true")


async def test_rows_appear_change_state_and_turn_dead_without_reload(bus: Bus, page: Any
                                                                      ) -> None:
    c1 = bus.coordinator("sw", "c1")
    async with running_dashboard(bus) as (url, _), anyio.create_task_group() as tg:
        async with c1.heartbeating(0.1):
            tg.start_soon(lambda: c1.wait_for("done", timeout=60))
            await until_states(bus, "sw", {"c1": "waiting"})
            await page.goto(f"{url}swarms/sw")
            await mark_loaded(page)
            await expect(row(page, "c1").locator(".badge").first).to_have_text("waiting")
            await expect(row(page, "c1")).to_have_attribute("data-dead", "false")
            await expect(page.locator("#live")).to_have_text("live")

            tg.start_soon(lambda: bus.wait_for("sw", "c2", "other", timeout=60))
            await expect(row(page, "c2")).to_have_attribute("data-state", "waiting",
                                                            timeout=LIVE_MS)
            await bus.publish("sw", "done", sender="v", await_acks=["c1"], ack_timeout=10)
            await expect(row(page, "c1")).to_have_attribute("data-state", "signaled",
                                                            timeout=LIVE_MS)
            await expect(row(page, "c2")).to_have_attribute("data-state", "waiting")
        # c1's heartbeats stopped: dead past --dead-after (1 s here), with nothing else changing
        await expect(row(page, "c1")).to_have_attribute("data-dead", "true", timeout=LIVE_MS)
        await expect(row(page, "c1").locator(".heartbeat")).to_contain_text("dead")
        # the pictures: c1's wait on the timeline, its ACK latency in the histogram of "done"
        await expect(page.locator("#timeline rect.span.signaled")).to_have_count(1)
        await expect(page.locator("#timeline rect.span.waiting")).to_have_count(1)
        await expect(page.locator('#latency .histogram[data-channel="done"]')).to_contain_text(
            "n=1")
        await assert_not_reloaded(page)
        tg.cancel_scope.cancel()


async def test_filter_and_its_deep_link(bus: Bus, page: Any) -> None:
    async with running_dashboard(bus) as (url, _), anyio.create_task_group() as tg:
        for name in ("alpha-1", "alpha-2", "beta-1"):
            tg.start_soon(lambda name=name: bus.wait_for("sw", name, "done", timeout=60))
        await until_states(bus, "sw", dict.fromkeys(("alpha-1", "alpha-2", "beta-1"), "waiting"))
        await page.goto(f"{url}swarms/sw")
        rows = page.locator("#coordinators tbody tr")
        await expect(rows).to_have_count(3)
        await page.fill("#filter", "alpha")
        await expect(rows).to_have_count(2)
        await expect(page).to_have_url(f"{url}swarms/sw?q=alpha")
        await page.fill("#filter", "beta")
        await expect(rows).to_have_count(1)
        await expect(row(page, "beta-1")).to_be_visible()

        await page.goto(f"{url}swarms/sw?q=alpha-2")  # a deep link
        await expect(page.locator("#filter")).to_have_value("alpha-2")
        await expect(rows).to_have_count(1)
        await expect(row(page, "alpha-2")).to_be_visible()
        await page.fill("#filter", "")
        await expect(rows).to_have_count(3)
        tg.cancel_scope.cancel()


async def test_bad_and_unknown_swarm_ids_are_4xx_pages(bus: Bus, page: Any) -> None:
    await bus.publish("known", "done", sender="v")
    async with running_dashboard(bus) as (url, _):
        response = await page.goto(f"{url}swarms/bad!id")
        assert response.status == 400
        await expect(page.locator("h1")).to_contain_text("Invalid swarm id")
        response = await page.goto(f"{url}swarms/nobody")
        assert response.status == 404
        await expect(page.locator("h1")).to_contain_text("Unknown swarm")
        await page.click("text=All swarms")
        await expect(page.locator('#swarms tr[data-swarm="known"]')).to_be_visible()
    # The browser reports the 4xx documents themselves; nothing else may be logged.
    page.console.errors = [e for e in page.console.errors
                           if "status of 400" not in e and "status of 404" not in e]


async def test_overview_lists_swarms_and_links_to_each(bus: Bus, page: Any) -> None:
    async with running_dashboard(bus) as (url, _), anyio.create_task_group() as tg:
        await EpicLoop(bus, "epic").start(["design", "build"])
        await EpicLoop(bus, "epic").transition("design", "implementing")
        tg.start_soon(lambda: bus.wait_for("epic", "c1", "loop2-done", timeout=60))
        await until_states(bus, "epic", {"c1": "waiting"})
        await page.goto(url)
        swarm = page.locator('#swarms tr[data-swarm="epic"]')
        await expect(swarm).to_contain_text("implementing (Loop 3)")
        await expect(swarm.locator("td").nth(2)).to_have_text("1")  # waiting
        await page.click('a[href="/swarms/epic"]')
        await expect(page).to_have_url(f"{url}swarms/epic")
        await expect(row(page, "c1")).to_have_attribute("data-state", "waiting")
        design = page.locator('.loop-phase[data-phase="design"]')
        await expect(design.locator(".step.current")).to_have_text("implementing (Loop 3)")
        await EpicLoop(bus, "epic").transition("design", "validating")
        await expect(design.locator(".step.current")).to_have_text("validating (Loop 2)",
                                                                   timeout=LIVE_MS)
        tg.cancel_scope.cancel()


async def test_pause_holds_the_view_and_resume_catches_up(bus: Bus, page: Any) -> None:
    async with running_dashboard(bus) as (url, _), anyio.create_task_group() as tg:
        tg.start_soon(lambda: bus.wait_for("sw", "c1", "done", timeout=60))
        await until_states(bus, "sw", {"c1": "waiting"})
        await page.goto(f"{url}swarms/sw")
        await expect(row(page, "c1")).to_be_visible()
        await page.click("#pause")
        await expect(page.locator("#live")).to_have_text("paused")
        await expect(page.locator("#pause")).to_have_text("Resume")
        tg.start_soon(lambda: bus.wait_for("sw", "c2", "done", timeout=60))
        await until_states(bus, "sw", {"c2": "waiting"})
        # Once the server's own feed has c2 (its JSON says so), the paused page still lacks it.
        with anyio.fail_after(LIVE_MS / 1000):
            while True:
                api = await (await page.request.get(f"{url}api/swarms/sw")).json()
                if "c2" in {r["coordinator"] for r in api["rows"]}:
                    break
                await anyio.sleep(0.05)
        await expect(row(page, "c2")).to_have_count(0)
        await page.click("#pause")
        await expect(row(page, "c2")).to_be_visible(timeout=LIVE_MS)
        await expect(page.locator("#live")).to_have_text("live")
        tg.cancel_scope.cancel()


async def test_redis_going_away_shows_a_banner_that_clears_itself(
    own_server: ServerProcess, namespace: str, page: Any
) -> None:
    async with streambus.connect(own_server.url, namespace=namespace) as bus:
        await bus.publish("sw", "done", sender="v")
        async with running_dashboard(bus) as (url, _):
            await page.goto(f"{url}swarms/sw")
            await mark_loaded(page)
            banner = page.locator("#banner")
            await expect(page.locator("#live")).to_have_text("live")
            await expect(banner).to_be_hidden()
            own_server.kill()
            await expect(banner).to_contain_text("Redis is unavailable", timeout=LIVE_MS * 2)
            own_server.restart()
            await expect(banner).to_be_hidden(timeout=LIVE_MS * 3)
            await expect(page.locator("#live")).to_have_text("live")
            await assert_not_reloaded(page)
