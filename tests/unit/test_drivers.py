"""engine.drivers: each driver's errors become the engine error of its table, from the original.

The driver exceptions are built directly, as the drivers raise them; no service is involved.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import asyncpg
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from aiokafka import errors as kafka
from elastic_transport import ApiResponseMeta, HttpHeaders, NodeConfig
from elasticsearch import (
    ApiError,
    AsyncElasticsearch,
    ConnectionError,
    ConnectionTimeout,
    NotFoundError,
    SerializationError,
)

from engine.drivers import (
    elasticsearch_address,
    elasticsearch_error,
    elasticsearch_errors,
    kafka_address,
    kafka_error,
    kafka_errors,
    postgres_address,
    postgres_error,
    postgres_errors,
    redis_address,
    redis_error,
    redis_errors,
)
from engine.errors import (
    ConflictError,
    EngineError,
    SchemaMissingError,
    ServiceUnavailableError,
    TransientError,
)
from engine.settings import (
    ElasticsearchSettings,
    KafkaSettings,
    PostgresSettings,
    RedisSettings,
)

Seam = Callable[..., AbstractContextManager[None]]
ADDRESS = "db.example:5433"


def _api_error(status: int) -> ApiError:
    meta = ApiResponseMeta(
        status=status,
        http_version="1.1",
        headers=HttpHeaders(),
        duration=0.0,
        node=NodeConfig("http", "localhost", 9200),
    )
    return ApiError(f"answered {status}", meta=meta, body={})


def _not_found() -> NotFoundError:
    error = _api_error(404)
    return NotFoundError(error.message, meta=error.meta, body={})


UNREACHABLE: list[tuple[Seam, str, Exception]] = [
    (postgres_errors, "PostgreSQL", ConnectionRefusedError(111, "Connection refused")),
    (postgres_errors, "PostgreSQL", OSError("no route to host")),
    (postgres_errors, "PostgreSQL", TimeoutError()),
    (postgres_errors, "PostgreSQL", asyncpg.InterfaceError("pool is closing")),
    (postgres_errors, "PostgreSQL", asyncpg.ConnectionDoesNotExistError("closed mid-operation")),
    (postgres_errors, "PostgreSQL", asyncpg.CannotConnectNowError("the database is starting")),
    (postgres_errors, "PostgreSQL", asyncpg.AdminShutdownError("terminating connection")),
    (postgres_errors, "PostgreSQL", asyncpg.CrashShutdownError("crash of another server")),
    (
        postgres_errors,
        "PostgreSQL",
        asyncpg.InternalClientError(
            "cannot switch to state 12; another operation (2) is in progress"
        ),
    ),
    (redis_errors, "Redis", redis.exceptions.ConnectionError("Error 111 connecting")),
    (redis_errors, "Redis", redis.exceptions.TimeoutError("Timeout reading from socket")),
    (redis_errors, "Redis", redis.exceptions.BusyLoadingError("loading the dataset")),
    (elasticsearch_errors, "Elasticsearch", ConnectionError("connection refused")),
    (elasticsearch_errors, "Elasticsearch", ConnectionTimeout("timed out")),
    (elasticsearch_errors, "Elasticsearch", SerializationError("not JSON")),
    (kafka_errors, "Kafka", kafka.KafkaConnectionError("connection refused")),
    (kafka_errors, "Kafka", kafka.NodeNotReadyError("node 1")),
    (kafka_errors, "Kafka", kafka.NoBrokersAvailable()),
    (kafka_errors, "Kafka", kafka.KafkaTimeoutError()),
    (kafka_errors, "Kafka", kafka.RequestTimedOutError()),
    (kafka_errors, "Kafka", TimeoutError()),
]

REFUSED: list[tuple[Seam, str, Exception]] = [
    (postgres_errors, "PostgreSQL", asyncpg.SerializationError("could not serialize")),
    (postgres_errors, "PostgreSQL", asyncpg.DeadlockDetectedError("deadlock detected")),
    (postgres_errors, "PostgreSQL", asyncpg.TooManyConnectionsError("too many clients")),
    (postgres_errors, "PostgreSQL", asyncpg.QueryCanceledError("statement timeout")),
    (redis_errors, "Redis", redis.exceptions.ReadOnlyError("READONLY replica")),
    (redis_errors, "Redis", redis.exceptions.ResponseError("OOM command not allowed")),
    (elasticsearch_errors, "Elasticsearch", _api_error(503)),
    (elasticsearch_errors, "Elasticsearch", _api_error(500)),
    (elasticsearch_errors, "Elasticsearch", _api_error(429)),
    (kafka_errors, "Kafka", kafka.UnknownTopicOrPartitionError()),
    (kafka_errors, "Kafka", kafka.NotLeaderForPartitionError()),
]

UNTOUCHED: list[tuple[Seam, Exception]] = [
    # What only the caller can give a meaning to passes as the driver raised it.
    (postgres_errors, asyncpg.UniqueViolationError("duplicate key")),
    (postgres_errors, asyncpg.DataError("value out of range")),
    (postgres_errors, asyncpg.InvalidPasswordError("password authentication failed")),
    (elasticsearch_errors, _api_error(400)),
    (elasticsearch_errors, _api_error(409)),
    (elasticsearch_errors, _not_found()),
    (kafka_errors, ValueError("not a Kafka error")),
    (redis_errors, OSError("not from redis: the driver wraps its own")),
    (elasticsearch_errors, TimeoutError("not from elasticsearch")),
]


def _ids(cases: list[tuple[Seam, str, Exception]]) -> list[str]:
    return [f"{service}-{type(exc).__name__}" for _, service, exc in cases]


@pytest.mark.parametrize(("seam", "service", "exc"), UNREACHABLE, ids=_ids(UNREACHABLE))
def test_an_unreachable_service_names_itself_and_its_address(
    seam: Seam, service: str, exc: Exception
) -> None:
    with pytest.raises(ServiceUnavailableError) as caught, seam(ADDRESS):
        raise exc
    error = caught.value
    assert (error.service, error.address) == (service, ADDRESS)
    assert f"{service} is not reachable at {ADDRESS}" in str(error)
    assert type(exc).__name__ in error.hint  # the driver's text goes into the hint
    assert error.__cause__ is exc


@pytest.mark.parametrize(("seam", "service", "exc"), REFUSED, ids=_ids(REFUSED))
def test_a_temporary_refusal_is_transient_and_names_the_service(
    seam: Seam, service: str, exc: Exception
) -> None:
    with pytest.raises(TransientError) as caught, seam(ADDRESS):
        raise exc
    assert not isinstance(caught.value, ServiceUnavailableError)
    assert f"{service} at {ADDRESS}" in str(caught.value)
    assert caught.value.__cause__ is exc


@pytest.mark.parametrize(
    ("seam", "exc"), UNTOUCHED, ids=[f"{s.__name__}-{type(e).__name__}" for s, e in UNTOUCHED]
)
def test_anything_else_passes_through_untouched(seam: Seam, exc: Exception) -> None:
    with pytest.raises(type(exc)) as caught, seam(ADDRESS):
        raise exc
    assert caught.value is exc
    assert caught.value.__cause__ is None


SEAMS = [postgres_errors, redis_errors, elasticsearch_errors, kafka_errors]


@pytest.mark.parametrize("seam", SEAMS)
def test_engine_errors_and_cancellation_pass_through(seam: Seam) -> None:
    conflict = ConflictError("a concurrent command changed it first")
    with pytest.raises(ConflictError) as caught, seam(ADDRESS):
        raise conflict
    assert caught.value is conflict
    with pytest.raises(BaseException) as cancelled, seam(ADDRESS):
        raise KeyboardInterrupt  # a BaseException, like asyncio.CancelledError
    assert type(cancelled.value) is KeyboardInterrupt


async def test_the_seams_work_around_awaits() -> None:
    async def fails() -> None:
        raise asyncpg.ConnectionDoesNotExistError("closed mid-operation")

    with pytest.raises(ServiceUnavailableError), postgres_errors(ADDRESS):
        await fails()


def test_a_missing_table_means_the_schema_is_not_set_up() -> None:
    exc = asyncpg.UndefinedTableError('relation "engine_outbox" does not exist')
    with pytest.raises(SchemaMissingError) as caught, postgres_errors(ADDRESS):
        raise exc
    assert 'relation "engine_outbox" does not exist' in str(caught.value)
    assert ADDRESS in str(caught.value)
    assert "engine migrate" in str(caught.value)
    assert caught.value.__cause__ is exc


def test_a_hint_replaces_the_driver_text_in_the_message() -> None:
    with pytest.raises(ServiceUnavailableError) as caught, redis_errors(ADDRESS, "Start it"):
        raise redis.exceptions.ConnectionError("Error 111")
    assert str(caught.value) == f"Redis is not reachable at {ADDRESS}. Start it"


def test_nothing_raised_is_nothing_translated() -> None:
    with postgres_errors(ADDRESS):
        value = 1
    assert value == 1


# -- addresses: host:port, never the driver's text ---------------------------------


def test_addresses_from_settings_name_the_setting_that_moves_them() -> None:
    assert postgres_address(PostgresSettings(host="pg", port=5433)) == (
        "pg:5433 (ENGINE_POSTGRES__PORT)"
    )
    assert redis_address(RedisSettings(host="rd", port=6380)) == "rd:6380 (ENGINE_REDIS__PORT)"
    assert elasticsearch_address(ElasticsearchSettings(url="http://es:9201")) == (
        "es:9201 (ENGINE_ELASTICSEARCH__URL)"
    )
    assert kafka_address(KafkaSettings(bootstrap_servers="k1:9092,k2:9092")) == (
        "k1:9092,k2:9092 (ENGINE_KAFKA__BOOTSTRAP_SERVERS)"
    )


async def test_addresses_from_clients_are_host_and_port() -> None:
    pool = asyncpg.create_pool(PostgresSettings(host="pg", port=5433).dsn())  # not connected
    assert postgres_address(pool) == "pg:5433"
    client = aioredis.Redis(host="rd", port=6380)
    assert redis_address(client) == "rd:6380"
    await client.aclose()
    es = AsyncElasticsearch("http://es:9201")
    assert elasticsearch_address(es) == "es:9201"
    await es.close()


def test_every_translation_is_an_engine_error() -> None:
    for seam, _, exc in UNREACHABLE + REFUSED:
        with pytest.raises(EngineError), seam(ADDRESS):
            raise exc


# -- the functions, for a boundary that sees the exception afterwards ---------------

TRANSLATIONS: dict[Seam, Callable[..., EngineError | None]] = {
    postgres_errors: postgres_error,
    redis_errors: redis_error,
    elasticsearch_errors: elasticsearch_error,
    kafka_errors: kafka_error,
}


@pytest.mark.parametrize(
    ("seam", "service", "exc"), UNREACHABLE + REFUSED, ids=_ids(UNREACHABLE + REFUSED)
)
def test_each_function_translates_as_its_seam_does(
    seam: Seam, service: str, exc: Exception
) -> None:
    with pytest.raises(EngineError) as caught, seam(ADDRESS, "Start it"):
        raise exc
    translated = TRANSLATIONS[seam](exc, ADDRESS, "Start it")
    assert type(translated) is type(caught.value)
    assert str(translated) == str(caught.value)
    assert service in str(translated)


@pytest.mark.parametrize(
    ("seam", "exc"), UNTOUCHED, ids=[f"{s.__name__}-{type(e).__name__}" for s, e in UNTOUCHED]
)
def test_each_function_leaves_alone_what_its_seam_lets_pass(seam: Seam, exc: Exception) -> None:
    assert TRANSLATIONS[seam](exc, ADDRESS) is None


async def test_an_elasticsearch_address_lists_every_node() -> None:
    es = AsyncElasticsearch(["http://es1.example:9200", "http://es2.example:9201"])
    try:
        # In the node pool's order, which it shuffles.
        assert set(elasticsearch_address(es).split(", ")) == {
            "es1.example:9200",
            "es2.example:9201",
        }
    finally:
        await es.close()
