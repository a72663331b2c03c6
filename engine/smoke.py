"""Round trips that prove each client really works against its service.

Each check writes a fresh random value through the real driver, reads it back
through the same driver and returns what it read; it cleans up what it made.
Connection failures are translated into :class:`ServiceUnavailableError`
naming the service, its address and the setting that moves it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from elasticsearch import ApiError, AsyncElasticsearch
from elasticsearch import ConnectionError as ESConnectionError
from redis.typing import EncodableT, FieldT

from engine.errors import EngineError, ServiceUnavailableError
from engine.settings import Settings, env_var

START_HINT = "Start the local stack with: ./dev up"


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
    try:
        conn = await asyncpg.connect(pg.dsn(), timeout=10)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise ServiceUnavailableError(
            "PostgreSQL", f"{pg.host}:{pg.port} ({env_var('postgres', 'port')})", START_HINT
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
        fields: dict[FieldT, EncodableT] = dict(written.items())
        await client.hset(key, mapping=fields)
        raw = await client.hgetall(key)
        await client.delete(key)
    except redis.exceptions.ConnectionError as exc:
        raise ServiceUnavailableError(
            "Redis", f"{rs.host}:{rs.port} ({env_var('redis', 'port')})", START_HINT
        ) from exc
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
        await admin.start()
    except KafkaError as exc:
        await admin.close()
        raise ServiceUnavailableError(
            "Kafka",
            f"{kafka.bootstrap_servers} ({env_var('kafka', 'bootstrap_servers')})",
            START_HINT,
        ) from exc
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
        # No `client.info()`: the integ-test-zip lacks the module serving `GET /`.
        # The 8.x client checks the X-Elastic-Product header of every response instead.
        await client.index(index=index, id="1", document=written)
        await client.indices.refresh(index=index)
        found = await client.search(
            index=index, query={"term": {"token.keyword": written["token"]}}
        )
        await client.indices.delete(index=index)
    except ESConnectionError as exc:
        raise ServiceUnavailableError(
            "Elasticsearch", f"{es_settings.url} ({env_var('elasticsearch', 'url')})", START_HINT
        ) from exc
    except ApiError as exc:
        raise SmokeCheckFailed(f"elasticsearch answered {exc.meta.status}: {exc.message}") from exc
    finally:
        await client.close()
    hits = found["hits"]["hits"]
    read = {k: str(v) for k, v in hits[0]["_source"].items()} if hits else {}
    return RoundTrip("elasticsearch", written, read, time.perf_counter() - started)


ROUND_TRIPS: dict[str, Callable[[Settings], Awaitable[RoundTrip]]] = {
    "postgres": postgres_round_trip,
    "redis": redis_round_trip,
    "kafka": kafka_round_trip,
    "elasticsearch": elasticsearch_round_trip,
}
