"""Commands in, events through the outbox and Kafka, every projection checked field by field."""

from __future__ import annotations

import asyncpg

from engine import CommandBus, Resources, Settings
from tests.integration.api.conftest import project
from tests.integration.read.expected import assert_projections_match
from tests.integration.read.scenario import populate


async def test_every_store_matches_the_write_model(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    await populate(bus, orders=40)
    await project(settings_for_test, resources)
    count = await assert_projections_match(
        settings_for_test, pool, resources.redis, resources.elasticsearch
    )
    assert count == 40


async def test_projections_follow_new_events_incrementally(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    await populate(bus, orders=10, seed=1)
    await project(settings_for_test, resources)
    await populate(bus, orders=10, seed=2)
    await project(settings_for_test, resources)
    assert (
        await assert_projections_match(
            settings_for_test, pool, resources.redis, resources.elasticsearch
        )
        == 20
    )
