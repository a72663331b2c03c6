"""Round trips that prove each client really works against its service.

Each check writes a fresh random value through the real driver, reads it back
through the same driver and returns what it read; it cleans up what it made.
Driver failures are translated by :mod:`engine.drivers`: one that cannot
reach its service raises :class:`ServiceUnavailableError` naming the service,
its address and the setting that moves it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from elastic_transport import ObjectApiResponse
from elasticsearch import ApiError, AsyncElasticsearch
from redis.typing import EncodableT, FieldT

from engine.drivers import (
    START_HINT,
    elasticsearch_address,
    elasticsearch_errors,
    kafka_address,
    kafka_errors,
    postgres_address,
    postgres_errors,
    redis_address,
    redis_errors,
)
from engine.errors import ConfigurationError, EngineError
from engine.settings import Settings, env_var

# The server answered and refused the role, password or database named: not an
# outage, so not left to engine.drivers, which would let it pass untranslated.
_LOGIN_REFUSED = (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidCatalogNameError)


class SmokeCheckFailed(EngineError):
    """A service answered, but did not give back what was written to it."""


@dataclass(frozen=True)
class RoundTrip:
    """What one smoke check wrote and read back, and how long it took."""

    service: str
    written: dict[str, str]
    read: dict[str, str]
    seconds: float

    def check(self) -> RoundTrip:
        if self.read != self.written:
            raise SmokeCheckFailed(f"{self.service}: wrote {self.written!r} but read {self.read!r}")
        return self


def _token() -> str:
    return uuid.uuid4().hex


async def postgres_round_trip(settings: Settings) -> RoundTrip:
    pg = settings.postgres
    started = time.perf_counter()
    written = {"token": _token()}
    with postgres_errors(postgres_address(pg), START_HINT):
        try:
            conn = await asyncpg.connect(pg.dsn(), timeout=10)
        except (
            asyncpg.InvalidAuthorizationSpecificationError,
            asyncpg.InvalidCatalogNameError,
        ) as exc:
            raise ConfigurationError(
                f"PostgreSQL at {postgres_address(pg)} refused the connection ({exc}); check "
                f"{env_var('postgres', 'user')}, {env_var('postgres', 'password')} and "
                f"{env_var('postgres', 'database')}"
            ) from exc
        try:
            async with conn.transaction():
                await conn.execute("CREATE TEMP TABLE smoke (token text NOT NULL) ON COMMIT DROP")
                await conn.execute("INSERT INTO smoke (token) VALUES ($1)", written["token"])
                token = await conn.fetchval("SELECT token FROM smoke")
        finally:
            await conn.close()
    return RoundTrip("postgres", written, {"token": str(token)}, time.perf_counter() - started)


async def redis_round_trip(settings: Settings) -> RoundTrip:
    rs = settings.redis
    started = time.perf_counter()
    key = f"engine:smoke:{_token()}"
    written: dict[str, str] = {"status": "CONFIRMED", "token": _token()}
    client = aioredis.Redis(
        host=rs.host, port=rs.port, db=rs.db, socket_connect_timeout=5, decode_responses=True
    )
    try:
        with redis_errors(redis_address(rs), START_HINT):
            fields: dict[FieldT, EncodableT] = dict(written.items())
            await client.hset(key, mapping=fields)
            raw = await client.hgetall(key)
            await client.delete(key)
    finally:
        await client.aclose()
    read = {str(k): str(v) for k, v in raw.items()}
    return RoundTrip("redis", written, read, time.perf_counter() - started)


async def kafka_round_trip(settings: Settings) -> RoundTrip:
    """Produce one message with headers to a fresh topic and consume it back."""
    kafka = settings.kafka
    started = time.perf_counter()
    topic = f"engine.smoke.{_token()}"
    written = {"key": _token(), "value": _token(), "header": "event-type"}
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers, request_timeout_ms=10000)
    try:
        with kafka_errors(kafka_address(kafka), START_HINT):
            await admin.start()
    except EngineError:
        await admin.close()
        raise
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
        read = await _produce_and_consume(kafka.bootstrap_servers, topic, written)
        await admin.delete_topics([topic])
    finally:
        await admin.close()
    return RoundTrip("kafka", written, read, time.perf_counter() - started)


async def _produce_and_consume(servers: str, topic: str, written: dict[str, str]) -> dict[str, str]:
    producer = AIOKafkaProducer(bootstrap_servers=servers, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(
            topic,
            key=written["key"].encode(),
            value=written["value"].encode(),
            headers=[("type", written["header"].encode())],
        )
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=servers, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        message = await consumer.getone()
    finally:
        await consumer.stop()
    headers = dict(message.headers)
    return {
        "key": message.key.decode(),
        "value": message.value.decode(),
        "header": headers["type"].decode(),
    }


async def elasticsearch_round_trip(settings: Settings) -> RoundTrip:
    """Index a document, refresh, and find it again with a search."""
    es_settings = settings.elasticsearch
    started = time.perf_counter()
    index = f"{es_settings.index_prefix}-smoke-{_token()}"
    written = {"customer": "Ada Lovelace", "token": _token()}
    client = AsyncElasticsearch(es_settings.url, request_timeout=es_settings.request_timeout_s)
    try:
        with elasticsearch_errors(elasticsearch_address(es_settings), START_HINT):
            found = await _index_and_search(client, index, written)
    finally:
        await client.close()
    hits = found["hits"]["hits"]
    read = {k: str(v) for k, v in hits[0]["_source"].items()} if hits else {}
    return RoundTrip("elasticsearch", written, read, time.perf_counter() - started)


async def _index_and_search(
    client: AsyncElasticsearch, index: str, written: dict[str, str]
) -> ObjectApiResponse[Any]:
    try:
        # No `client.info()`: the integ-test-zip lacks the module serving `GET /`.
        # The 8.x client checks the X-Elastic-Product header of every response instead.
        await client.index(index=index, id="1", document=written)
        await client.indices.refresh(index=index)
        found = await client.search(
            index=index, query={"term": {"token.keyword": written["token"]}}
        )
        await client.indices.delete(index=index)
    except ApiError as exc:  # any answer but success, 5xx too: the check failed
        raise SmokeCheckFailed(f"elasticsearch answered {exc.meta.status}: {exc.message}") from exc
    return found


ROUND_TRIPS: dict[str, Callable[[Settings], Awaitable[RoundTrip]]] = {
    "postgres": postgres_round_trip,
    "redis": redis_round_trip,
    "kafka": kafka_round_trip,
    "elasticsearch": elasticsearch_round_trip,
}
