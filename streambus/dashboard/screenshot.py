"""The README's dashboard figure, from a real run: ``python -m streambus.dashboard.screenshot``.

Runs ``streambus demo`` (real agent processes, a fresh namespace) and the dashboard on a free
port, opens the demo's swarm in headless Chromium (Debian's ``/usr/bin/chromium`` through
Playwright: the dev extra) and saves the page once the epic's Loop 3 coordinators block, the
timeline and the latency histogram have something to show. Needs the dev extra and Chromium.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
from pathlib import Path

import anyio
from playwright.async_api import Page, async_playwright, expect

from streambus.bus import connect
from streambus.cfn.demo import DemoOptions, run_demo
from streambus.dashboard import DashboardOptions, serve

WAIT_MS = 60_000


async def take(out: Path, *, redis_url: str | None, chromium: str, seed: int) -> None:
    namespace = f"screenshot{secrets.token_hex(3)}"
    async with connect(redis_url, namespace=namespace) as bus, anyio.create_task_group() as tg:
        url = await tg.start(lambda task_status: serve(
            bus, DashboardOptions(dead_after=30.0), port=0, task_status=task_status))
        tg.start_soon(lambda: run_demo(bus, DemoOptions(seed=seed, json=True, timeout=90)))
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=chromium)
            page = await browser.new_page(viewport={"width": 1360, "height": 900})
            await page.goto(url)
            link = page.locator("#swarms tbody a").first
            await expect(link).to_be_visible(timeout=WAIT_MS)
            await link.click()
            await _interesting_moment(page)
            out.parent.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(out), full_page=True)
            await browser.close()
        tg.cancel_scope.cancel()


async def _interesting_moment(page: Page) -> None:
    """Phase 1 in a retry round: ACKs measured, coordinators blocked on Loop 2 again."""
    await expect(page.locator(".loop-phase .step.current").first).to_contain_text(
        "validating", timeout=WAIT_MS)
    await expect(page.locator(".histogram").first).to_be_visible(timeout=WAIT_MS)
    waiting = page.locator('#coordinators tr[data-state="waiting"]')
    await expect(waiting.nth(2)).to_be_visible(timeout=WAIT_MS)
    await expect(page.locator("#timeline rect.span.signaled").nth(2)).to_be_attached(
        timeout=WAIT_MS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images/dashboard.png"))
    parser.add_argument("--redis-url", default=None, help="default: the embedded server")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    anyio.run(lambda: take(args.out, redis_url=args.redis_url, chromium=args.chromium,
                           seed=args.seed))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
