"""The connections a daemon holds: opened once, closed on the way out.

Waiting for them at start-up: :mod:`engine.startup`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
import redis.asyncio as aioredis
from elasticsearch import AsyncElasticsearch
from elasticsearch.serializer import OrjsonSerializer

from engine.postgres.pool import create_pool
from engine.settings import PostgresSettings, Settings


@dataclass(frozen=True)
class Resources:
    """What projection factories build their stores from."""

    settings: Settings
    pool: asyncpg.Pool
    redis: aioredis.Redis
    elasticsearch: AsyncElasticsearch


@asynccontextmanager
async def open_resources(
    settings: Settings, postgres: PostgresSettings | None = None
) -> AsyncIterator[Resources]:
    """Connections to every store; Postgres as ``postgres`` (default: the write side's)."""
    pool = await create_pool(postgres or settings.postgres)
    redis_client = aioredis.Redis(
        host=settings.redis.host,
        port=settings.redis.port,
        db=settings.redis.db,
        socket_connect_timeout=5,
        socket_timeout=30,
        decode_responses=True,
    )
    es = AsyncElasticsearch(
        settings.elasticsearch.url,
        request_timeout=settings.elasticsearch.request_timeout_s,
        # orjson for every JSON body and answer: the standard json module's
        # encode and decode were a tenth of the daemon's CPU.
        serializer=OrjsonSerializer(),
    )
    try:
        yield Resources(settings=settings, pool=pool, redis=redis_client, elasticsearch=es)
    finally:
        await es.close()
        await redis_client.aclose()
        await pool.close()
