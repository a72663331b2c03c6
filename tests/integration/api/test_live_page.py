"""The live page at ``/`` in a real headless Chromium, against ``engine api`` on the real stack.

No daemon runs for this test's topic: whatever the relay publishes stays
unapplied, so every projection's lag rises by exactly what was published, and
the page (opened once, never reloaded) must show it. The API has a reader key,
given to the page as ``?key=``. The browser is the system's Chromium (Debian's
``chromium`` package, which ``./dev test`` installs) driven by Playwright; a
screenshot of the page, and one taken after the API stopped (the page keeps the
last data and says it is stale), are saved under ``test-artifacts/`` (or
``$ENGINE_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from playwright.async_api import ConsoleMessage, Page, Request, async_playwright

from engine import CommandBus, OutboxRelay, Settings, open_resources
from projections.orders import APP
from tests.helpers import free_port, new_customer, settings_env, start_engine

ROOT = Path(__file__).resolve().parents[3]
KEY = "live-page-reader-key"
# Each round's commands make one event each, and every projection lags by all of them.
ROUNDS = (6, 9, 12)


def _artifacts() -> Path:
    found = os.environ.get("ENGINE_TEST_ARTIFACTS")
    path = Path(found) if found else ROOT / "test-artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(
            "Chromium is not installed, and the live page is tested in a real browser: "
            "`./dev test` installs Debian's `chromium` package when it runs as root; "
            "otherwise run `sudo apt-get install chromium`.",
            pytrace=False,
        )
    return path


@dataclass
class _Seen:
    """What the page did besides drawing: its requests, console messages and uncaught errors."""

    requests: list[str] = field(default_factory=list)
    console: list[ConsoleMessage] = field(default_factory=list)
    crashes: list[Exception] = field(default_factory=list)

    # Plain methods: Playwright cannot wrap a builtin such as list.append as a listener.
    def request(self, request: Request) -> None:
        self.requests.append(request.url)

    def message(self, message: ConsoleMessage) -> None:
        self.console.append(message)

    def crash(self, error: Exception) -> None:
        self.crashes.append(error)

    def errors(self) -> list[str]:
        return [m.text for m in self.console if m.type == "error"]


@asynccontextmanager
async def _browser_page() -> AsyncIterator[tuple[Page, _Seen]]:
    """A page in the system's headless Chromium, and what it is seen doing."""
    chromium = _chromium()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium,
            # As root Chromium refuses its sandbox; a container's /dev/shm is small.
            args=[*(["--no-sandbox"] if os.geteuid() == 0 else []), "--disable-dev-shm-usage"],
        )
        try:
            page = await browser.new_page(viewport={"width": 1440, "height": 900})
            seen = _Seen()
            page.on("request", seen.request)
            page.on("console", seen.message)
            page.on("pageerror", seen.crash)
            yield page, seen
        finally:
            await browser.close()


@asynccontextmanager
async def _engine_api(settings: Settings) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """``engine api`` for this test's names, with a reader key; its base URL and process."""
    port = free_port()
    env = {
        **settings_env(settings),
        "ENGINE_API__PORT": str(port),
        "ENGINE_API__READER_KEY": KEY,
        "ENGINE_API__GRACEFUL_SHUTDOWN_S": "1",
        "ENGINE_OPS__STATUS_INTERVAL_S": "1",
    }
    api = await start_engine("api", "--log-level", "warning", env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        await _serving(base, api)
        yield base, api
    finally:
        await _stop(api)


async def _serving(base: str, api: asyncio.subprocess.Process) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    async with httpx.AsyncClient() as client:
        while loop.time() < deadline:
            assert api.returncode is None, f"engine api exited with {api.returncode}"
            try:
                if (await client.get(f"{base}/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{base} never answered")


async def _stop(api: asyncio.subprocess.Process) -> None:
    if api.returncode is None:
        api.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(api.wait(), 20)
        except TimeoutError:
            api.kill()
            await api.wait()


async def _shown(page: Page, field: str) -> dict[str, str]:
    """Per projection card, the text the page shows in ``field``."""
    shown: dict[str, str] = await page.locator("article.card").evaluate_all(
        "(cards, field) => Object.fromEntries(cards.map((c) => [c.dataset.projection,"
        " c.querySelector(`[data-field='${field}']`).textContent]))",
        field,
    )
    return shown


async def _wait_for_lag(page: Page, events: int) -> None:
    """Until every card shows ``events`` events behind (as a figure and on its chart)."""
    await page.wait_for_function(
        """(events) => {
            const cards = [...document.querySelectorAll("article.card")];
            return cards.length > 0 && cards.every((c) =>
                Number(c.querySelector("[data-field='lag-events']").textContent.replace(/,/g, ""))
                    === events
                && c.dataset.lagEvents === String(events));
        }""",
        arg=events,
        timeout=15_000,
    )


@pytest.mark.timeout(90)
async def test_the_live_page_shows_every_projection_and_follows_the_lag(
    settings_for_test: Settings, pool: asyncpg.Pool, bus: CommandBus
) -> None:
    settings = settings_for_test
    # Opened for the names only: building the stores talks to none of them (and without the
    # resources fixture, whose clean-up would wait on Elasticsearch, which this test never uses).
    async with open_resources(settings) as opened:
        names = [projection.name for projection, _store in APP.projections(opened)]
    assert len(names) == 5
    relay = OutboxRelay(settings.postgres, settings.kafka, settings.relay)
    async with _engine_api(settings) as (base, api), _browser_page() as (page, seen):
        answer = await page.goto(f"{base}/?key={KEY}")
        assert answer is not None and answer.ok
        # The browser itself holds the page to its own origin.
        assert "connect-src 'self'" in answer.headers["content-security-policy"]

        # Every projection of the application, in a card, caught up (nothing published).
        await page.wait_for_function(
            "(n) => document.querySelectorAll('article.card').length === n", arg=len(names)
        )
        assert sorted(await _shown(page, "lag-events")) == sorted(names)
        await _wait_for_lag(page, 0)
        assert "key=" not in page.url  # taken out of the address bar once stored
        await page.evaluate("() => { window.sameDocument = true; }")

        # Lag rises round by round, and the page follows without a reload.
        published = 0
        for commands in ROUNDS:
            for _ in range(commands):
                await new_customer(bus)
            await relay.drain()
            published += commands
            await _wait_for_lag(page, published)
        assert await page.evaluate("() => window.sameDocument === true")
        seconds = await _shown(page, "lag-seconds")
        assert all(text not in {"0 s", "?"} for text in seconds.values()), seconds
        points = await page.locator("figure[data-series='events'] svg").evaluate_all(
            "(svgs) => svgs.map((s) => Number(s.dataset.points))"
        )
        assert len(points) == len(names)
        assert all(n >= len(ROUNDS) + 1 for n in points), points
        assert await page.locator("#conn").get_attribute("data-stale") == "false"
        await page.screenshot(path=_artifacts() / "live-page.png", full_page=True)
        assert not seen.errors()

        # The API goes away: the page keeps the last figures and says they are stale.
        await _stop(api)
        await page.wait_for_selector("#conn[data-stale='true']", timeout=10_000)
        await page.wait_for_selector("#unreachable")
        assert set((await _shown(page, "lag-events")).values()) == {str(published)}
        await page.screenshot(path=_artifacts() / "live-page-stale.png", full_page=True)

    assert not seen.crashes, seen.crashes
    # Since the API went away, only the browser's own note of each refused connection.
    assert all("Failed to load resource" in text for text in seen.errors()), seen.errors()
    hosts = {urlsplit(url).netloc for url in seen.requests if not url.startswith("data:")}
    assert hosts == {urlsplit(base).netloc}, hosts
