"""Two daemons starting together set up the same tables, views and index at the same moment.

Each round sets up a generation nobody has created yet from many tasks at once
(each on its own connection or request), so the catalogue races of
``CREATE TABLE IF NOT EXISTS``, ``CREATE VIEW`` and index/alias creation are
hit every time, not by luck: every set-up must succeed and leave one working
generation behind.
"""

from __future__ import annotations

import asyncio

import pytest

from engine import (
    ElasticsearchDocumentStore,
    PostgresDocumentStore,
    PostgresSqlStore,
    ProjectionStore,
    Resources,
)
from projections.orders.wiring import build_projections

_CONCURRENT = 8
_ROUNDS = 4


def _store(resources: Resources, kind: type) -> ProjectionStore:
    return next(s for _p, s in build_projections(resources) if type(s) is kind)


async def _race(store: ProjectionStore) -> None:
    """Set up fresh generations of ``store`` from many tasks at once; none may fail."""
    assert isinstance(store, PostgresDocumentStore | PostgresSqlStore | ElasticsearchDocumentStore)
    for generation in range(1, _ROUNDS + 1):
        fresh = store.at_generation(generation)
        # Separate objects, as separate daemons would have.
        racers = [store.at_generation(generation) for _ in range(_CONCURRENT)]
        results = await asyncio.gather(*(r.setup() for r in racers), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert failures == [], f"generation {generation}: {failures[:3]}"
        await fresh.setup()  # and again, alone: still harmless


@pytest.mark.parametrize("kind", [PostgresDocumentStore, PostgresSqlStore])
async def test_postgres_setup_is_safe_to_run_concurrently(resources: Resources, kind: type) -> None:
    store = _store(resources, kind)
    await _race(store)
    # The readers' view exists and reads the first generation's table(s).
    views = await resources.pool.fetch("SELECT viewname FROM pg_views WHERE schemaname = 'public'")
    assert views, "no readers' view was created"
    tables = await resources.pool.fetchval(
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename ~ '_g[1-4]$'"
    )
    assert tables >= _ROUNDS


async def test_elasticsearch_setup_is_safe_to_run_concurrently(resources: Resources) -> None:
    store = _store(resources, ElasticsearchDocumentStore)
    assert isinstance(store, ElasticsearchDocumentStore)
    await _race(store)
    es = resources.elasticsearch
    for generation in range(1, _ROUNDS + 1):
        assert await es.indices.exists(index=store.at_generation(generation).index)
    # The alias was created once, by whoever won, and points at exactly one index.
    aliased = (await es.indices.get_alias(name=store.alias)).body
    assert list(aliased) == [store.at_generation(1).index]
