"""Every store equals a fold of the event log: the reference the soak tests compare against.

The reference is computed by the engine's own stores, but from scratch: the
whole event log, in position order, applied to a fresh generation of each
projection's store (a number no rebuild uses). The live generation, which the
daemon wrote under kills, rebalances and rebuilds, must then hold exactly the
same rows, hashes and documents, field by field.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import asyncpg
from elasticsearch import AsyncElasticsearch
from redis.asyncio import Redis

from engine import (
    ElasticsearchDocumentStore,
    EventEnvelope,
    PostgresDocumentStore,
    PostgresSqlStore,
    Projected,
    Projection,
    ProjectionStore,
    RebuildableStore,
    RedisHashStore,
    Resources,
    SqlProjection,
)
from engine.application import Application
from engine.generations import current_generation
from engine.postgres import outbox
from engine.testing import project_into

REFERENCE = 9999  # a generation number no rebuild reaches in a test


async def _log(pool: asyncpg.Pool, application: Application) -> list[Projected]:
    async with pool.acquire() as conn:
        envelopes = await outbox.read_log(
            conn, 0, 10_000_000, sorted(application.registry.event_types), below_horizon=False
        )
    return [Projected(e, application.registry.decode(e)) for e in envelopes]


async def assert_stores_equal_the_log(
    application: Application,
    resources: Resources,
    *,
    skip: set[str] | None = None,
    extra: Sequence[EventEnvelope] = (),
) -> dict[str, int]:
    """Fold the log into a reference generation of every projection and compare.

    Returns, per projection, how many rows/hashes/documents were compared.
    ``skip`` names aggregate ids to leave out (parked aggregates, say).
    ``extra`` are events the log does not hold (produced straight to the topic,
    as a newer release would): decoded by ``application``'s registry and folded
    after the log's events, in the order given.
    """
    events = await _log(resources.pool, application)
    events += [Projected(e, application.registry.decode(e)) for e in extra]
    compared = {}
    for projection, store in application.projections(resources):
        assert isinstance(store, RebuildableStore), projection.name
        async with resources.pool.acquire() as conn:
            live = store.at_generation(await current_generation(conn, projection.name))
        reference = store.at_generation(REFERENCE)
        await reference.drop()
        try:
            await project_into((projection, reference), events, batch_size=500)
            compared[projection.name] = await _compare(
                resources, projection, live, reference, skip or set()
            )
        finally:
            await reference.drop()
    return compared


async def _compare(
    resources: Resources,
    projection: Projection,
    live: ProjectionStore,
    reference: ProjectionStore,
    skip: set[str],
) -> int:
    if isinstance(live, PostgresDocumentStore):
        assert isinstance(reference, PostgresDocumentStore)
        return await _compare_tables(resources.pool, [(live.table, reference.table)], skip)
    if isinstance(live, PostgresSqlStore):
        assert isinstance(reference, PostgresSqlStore) and isinstance(projection, SqlProjection)
        pairs = [
            (f"{t}_g{live.generation}", f"{t}_g{reference.generation}") for t in projection.tables
        ]
        return await _compare_tables(resources.pool, pairs, skip)
    if isinstance(live, RedisHashStore):
        assert isinstance(reference, RedisHashStore)
        mine = await _hashes(resources.redis, live.key_prefix)
        return _same(mine, await _hashes(resources.redis, reference.key_prefix), skip)
    if isinstance(live, ElasticsearchDocumentStore):
        assert isinstance(reference, ElasticsearchDocumentStore)
        mine = await _documents(resources.elasticsearch, live.index)
        return _same(mine, await _documents(resources.elasticsearch, reference.index), skip)
    raise AssertionError(f"no comparison for {type(live).__name__}")


def _same(live: dict[str, Any], reference: dict[str, Any], skip: set[str]) -> int:
    live = {k: v for k, v in live.items() if k not in skip}
    reference = {k: v for k, v in reference.items() if k not in skip}
    missing = sorted(set(reference) - set(live))
    extra = sorted(set(live) - set(reference))
    wrong = sorted(k for k in set(live) & set(reference) if live[k] != reference[k])
    assert not (missing or extra or wrong), {
        "missing": missing[:5],
        "extra": extra[:5],
        "wrong": [(k, live[k], reference[k]) for k in wrong[:3]],
        "counts": (len(missing), len(extra), len(wrong)),
    }
    return len(reference)


async def _compare_tables(pool: asyncpg.Pool, pairs: list[tuple[str, str]], skip: set[str]) -> int:
    """Rows compared whole (as JSON), keyed by their id column where they have one."""
    compared = 0
    for mine, theirs in pairs:
        _same(await _rows(pool, mine), await _rows(pool, theirs), skip)
        compared += await pool.fetchval(f"SELECT count(*) FROM {theirs}")
    return compared


async def _rows(pool: asyncpg.Pool, table: str) -> dict[str, Any]:
    rows = await pool.fetch(f"SELECT to_jsonb(t)::text AS row FROM {table} t")
    found: dict[str, Any] = {}
    for record in rows:
        row = json.loads(record["row"])
        key = str(row.get("id") or row.get("order_id") or record["row"])
        assert key not in found, (table, key)
        found[key] = row
    return found


async def _hashes(client: Redis, prefix: str) -> dict[str, dict[str, str]]:
    found = {}
    async for key in client.scan_iter(match=f"{prefix}*", count=1000):
        text = key.decode() if isinstance(key, bytes) else key
        fields = await client.hgetall(key)
        found[text.removeprefix(prefix)] = {_text(k): _text(v) for k, v in fields.items()}
    return found


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _documents(client: AsyncElasticsearch, index: str) -> dict[str, dict[str, Any]]:
    await client.indices.refresh(index=index)
    found: dict[str, dict[str, Any]] = {}
    response = await client.search(
        index=index, size=1000, query={"match_all": {}}, sort=["_doc"], scroll="1m"
    )
    scroll_id = response.get("_scroll_id")
    try:
        while hits := response["hits"]["hits"]:
            found.update({hit["_id"]: hit["_source"] for hit in hits})
            response = await client.scroll(scroll_id=scroll_id, scroll="1m")
            scroll_id = response.get("_scroll_id")
    finally:
        if scroll_id:
            await client.clear_scroll(scroll_id=scroll_id)
    return found
