"""The generation fence fails closed: a lane that cannot take it writes nothing, anywhere."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid

import asyncpg
from aiokafka import TopicPartition

from engine import Resources, Settings
from engine.deliveries import Batch, Delivery
from engine.events import EventEnvelope
from engine.generations import GenerationFence, fence_key
from engine.lane import Lane
from engine.postgres.checkpoints import CheckpointStore
from engine.postgres.deadletters import DeadLetterStore
from engine.projection import Projected
from engine.stores.postgres import PostgresDocumentStore
from projections.orders import APP
from projections.orders.views import OrderDetails
from tests.integration.read.generation_kit import order_created, until


def _batch(order_id: str) -> Batch:
    row = order_created(order_id)
    envelope = EventEnvelope(
        event_id=row[0],
        event_type=row[1],
        schema_version=row[2],
        aggregate_type=row[3],
        aggregate_id=row[4],
        aggregate_version=row[5],
        position=1,
        occurred_at=row[6],
        correlation_id=row[7],
        causation_id=row[8],
        payload=json.loads(row[9]),
    )
    item = Projected(envelope, APP.registry.decode(envelope))
    return Batch([Delivery(TopicPartition("t", 0), 0, order_id.encode(), b"", [], item)])


async def _rows(pool: asyncpg.Pool, table: str, order_id: str) -> int:
    if await pool.fetchval("SELECT to_regclass($1)", table) is None:
        return 0
    return int(await pool.fetchval(f"SELECT count(*) FROM {table} WHERE id = $1", order_id))


async def test_a_lane_that_cannot_take_the_fence_writes_nothing_then_the_current_generation(
    pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    # A rebuild switched order_details to generation 2 earlier; this lane starts at 1.
    await pool.execute(
        "INSERT INTO engine_projection_generations (projection, generation) VALUES ($1, 2)",
        "order_details",
    )
    projection = OrderDetails()
    first = PostgresDocumentStore(pool, projection, "order_details", OrderDetails.SCHEMA)
    await first.setup()  # generation 1 is still there (kept by the rebuild, say)
    lane = Lane(
        projection,
        first,
        settings=settings_for_test.runner.model_copy(
            update={"backoff_initial_s": 0.05, "backoff_max_s": 0.2}
        ),
        dead_letters=DeadLetterStore(pool),
        checkpoints=CheckpointStore(pool),
        fence=GenerationFence(settings_for_test.postgres, "order_details"),
    )
    database = settings_for_test.postgres.database
    holder = await asyncpg.connect(settings_for_test.postgres.dsn())
    order_id = str(uuid.uuid4())
    task: asyncio.Task[None] | None = None
    try:
        # What a rebuild's switch does: hold the exclusive fence. The role's lock_timeout
        # makes every wait for it fail fast, as a production role's timeout would.
        await holder.execute(
            "SELECT pg_advisory_lock(hashtextextended($1, 0))", fence_key("order_details")
        )
        await holder.execute(
            f'ALTER ROLE CURRENT_USER IN DATABASE "{database}" SET lock_timeout = 100'
        )
        task = asyncio.create_task(lane.process(_batch(order_id)))

        async def failing_or_done() -> bool:
            return lane.failing is not None or task.done()

        await until(failing_or_done, "the lane to fail on the fence or finish")
        assert not task.done(), "the lane applied the batch without the fence"
        assert "lock" in (lane.failing or ""), lane.failing
        for table in ("order_details_g1", "order_details_g2"):
            assert await _rows(pool, table, order_id) == 0, table

        await holder.execute(
            "SELECT pg_advisory_unlock(hashtextextended($1, 0))", fence_key("order_details")
        )
        await asyncio.wait_for(task, timeout=30)
        assert await _rows(pool, "order_details_g2", order_id) == 1
        assert await _rows(pool, "order_details_g1", order_id) == 0
        assert await _rows(pool, "order_details", order_id) == 1  # readers see generation 2
    finally:
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(Exception):
            await holder.execute(
                f'ALTER ROLE CURRENT_USER IN DATABASE "{database}" RESET lock_timeout'
            )
        await holder.close()
        await lane.close()
