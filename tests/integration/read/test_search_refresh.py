"""The search index's refresh policy does what it says, against the real daemon and Elasticsearch.

The index's own ``refresh_interval`` is 30 s in both cases, so nothing but
the policy can make a new document searchable within the test's wait: with
``after_write`` the daemon's refresh does; with ``interval`` no search sees the
document, though a real-time get shows it was written.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Literal

from elasticsearch import AsyncElasticsearch, NotFoundError

from engine import CommandBus, Resources, Settings
from projections.orders.wiring import search_alias
from tests.helpers import new_customer, new_order, new_product
from tests.integration.api.conftest import engine_running

WAIT_S = 3.0  # far above one batch plus one refresh, far below the 30 s interval


def _with_policy(settings: Settings, refresh: Literal["interval", "after_write"]) -> Settings:
    search = settings.elasticsearch.model_copy(
        update={"refresh": refresh, "refresh_interval": "30s", "refresh_min_gap_ms": 100}
    )
    return settings.model_copy(update={"elasticsearch": search})


async def _written(client: AsyncElasticsearch, alias: str, doc_id: str) -> None:
    """Until a real-time get (which needs no refresh) finds the daemon's document."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            await client.get(index=alias, id=doc_id, realtime=True)
            return
        except NotFoundError:
            await asyncio.sleep(0.02)
    raise AssertionError(f"the daemon did not write {doc_id} within 60 s")


async def _searchable_within(
    client: AsyncElasticsearch, alias: str, doc_id: str, wait_s: float
) -> bool:
    """Whether a plain search (no refresh asked by us) finds the document within ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        found = await client.search(index=alias, query={"ids": {"values": [doc_id]}})
        if found["hits"]["total"]["value"] == 1:
            return True
        await asyncio.sleep(0.05)
    return False


async def _order_searchable(
    refresh: Literal["interval", "after_write"],
    bus: CommandBus,
    settings: Settings,
    resources: Resources,
) -> bool:
    settings = _with_policy(settings, refresh)
    resources = dataclasses.replace(resources, settings=settings)
    alias = search_alias(resources)
    customer = await new_customer(bus)
    product = await new_product(bus)
    async with engine_running(settings, resources):
        order = (await new_order(bus, customer, [(product, 2)])).aggregate_id
        await _written(resources.elasticsearch, alias, order)
        return await _searchable_within(resources.elasticsearch, alias, order, WAIT_S)


async def test_after_write_makes_the_daemons_writes_searchable_without_waiting_for_the_interval(
    bus: CommandBus, settings_for_test: Settings, resources: Resources
) -> None:
    assert await _order_searchable("after_write", bus, settings_for_test, resources)


async def test_interval_leaves_the_daemons_writes_unsearchable_until_the_index_refreshes(
    bus: CommandBus, settings_for_test: Settings, resources: Resources
) -> None:
    assert not await _order_searchable("interval", bus, settings_for_test, resources)
