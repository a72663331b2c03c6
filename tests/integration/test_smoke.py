"""Each client really talks to its service, configured through the settings object."""

import pytest

from engine.errors import ServiceUnavailableError
from engine.settings import RedisSettings, Settings
from engine.smoke import (
    elasticsearch_round_trip,
    kafka_round_trip,
    postgres_round_trip,
    redis_round_trip,
)


async def test_asyncpg_round_trip(stack: Settings) -> None:
    trip = await postgres_round_trip(stack)
    assert trip.read == trip.written
    assert len(trip.read["token"]) == 32


async def test_redis_hset_hgetall(stack: Settings) -> None:
    trip = await redis_round_trip(stack)
    assert trip.read == trip.written
    assert trip.read["status"] == "CONFIRMED"


async def test_kafka_produce_consume_on_a_fresh_topic(stack: Settings) -> None:
    trip = await kafka_round_trip(stack)
    assert trip.read == trip.written
    assert trip.read["header"] == "event-type"


async def test_elasticsearch_index_refresh_search(stack: Settings) -> None:
    trip = await elasticsearch_round_trip(stack)
    assert trip.read == trip.written


async def test_a_down_service_is_reported_with_its_address_and_the_fix(stack: Settings) -> None:
    wrong = stack.model_copy(update={"redis": RedisSettings(port=1)})
    with pytest.raises(
        ServiceUnavailableError, match=r"Redis is not reachable at 127.0.0.1:1 .*\./dev up"
    ):
        await redis_round_trip(wrong)
