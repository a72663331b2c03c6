"""The real API application (lifespan and all) served over an in-process HTTP transport."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import httpx
import pytest

from engine import OutboxRelay, Resources, Settings
from engine.api import create_app
from engine.daemon import build_runner
from projections.orders import APP


@asynccontextmanager
async def api_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client on the app of ``settings``, with its connections opened (lifespan)."""
    app = create_app(settings, APP)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client


@pytest.fixture
async def api(
    settings_for_test: Settings, pool: asyncpg.Pool, resources: Resources
) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(settings_for_test) as client:
        yield client


async def project(settings: Settings, resources: Resources) -> None:
    """Publish what is in the outbox and apply it to every projection, then return."""
    await OutboxRelay(settings.postgres, settings.kafka, settings.relay).drain()
    runner = build_runner(APP, resources)
    await asyncio.wait_for(runner.run(asyncio.Event(), until_caught_up=True), timeout=90)


@asynccontextmanager
async def engine_running(settings: Settings, resources: Resources) -> AsyncIterator[None]:
    """The relay and the projection daemon running in the background, stopped on exit."""
    stop = asyncio.Event()
    relay = OutboxRelay(settings.postgres, settings.kafka, settings.relay)
    runner = build_runner(APP, resources)
    tasks = [asyncio.create_task(relay.run(stop)), asyncio.create_task(runner.run(stop))]
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
