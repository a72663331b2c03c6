"""`engine status` keeps a recovered error as the last one, but no longer as the current one."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg

from engine import Resources
from engine.lane import Lane
from engine.postgres.checkpoints import CheckpointStore, PartitionProgress
from engine.postgres.deadletters import DeadLetterStore
from engine.projection import Projected, ProjectionStore
from engine.settings import Settings
from engine.status import ProjectionStatus, collect_status
from projections.orders import APP

_RACE = (
    "UniqueViolationError: duplicate key value violates unique constraint"
    ' "pg_type_typname_nsp_index"'
)


async def _status_of(settings: Settings, resources: Resources, name: str) -> ProjectionStatus:
    status = await collect_status(settings, APP, resources)
    return next(p for p in status.projections if p.name == name)


async def test_an_error_recovered_by_a_set_up_is_the_last_not_the_current(
    settings_for_test: Settings, pool: asyncpg.Pool, resources: Resources
) -> None:
    checkpoints = CheckpointStore(pool)
    await checkpoints.recovered("order_details")  # nothing to recover from: no row, no error
    await checkpoints.failed("order_details", _RACE)

    failing = await _status_of(settings_for_test, resources, "order_details")
    assert failing.error_current and not failing.healthy and failing.recovered_at is None

    await checkpoints.recovered("order_details")
    recovered = await _status_of(settings_for_test, resources, "order_details")
    assert not recovered.error_current and recovered.healthy
    assert recovered.last_error == _RACE  # still shown, as the last error
    assert recovered.last_error_at is not None and recovered.recovered_at is not None
    assert recovered.recovered_at > recovered.last_error_at
    assert recovered.updated_at is None  # no batch finished: recovery is not progress

    await checkpoints.failed("order_details", "ConnectionError: down again")
    again = await _status_of(settings_for_test, resources, "order_details")
    assert again.error_current and again.recovered_at is None
    assert again.last_error == "ConnectionError: down again"


async def test_an_error_recovered_by_a_batch_shows_when(
    settings_for_test: Settings, pool: asyncpg.Pool, resources: Resources
) -> None:
    checkpoints = CheckpointStore(pool)
    await checkpoints.failed("order_search", "ConnectionError: the search store is down")
    topic = settings_for_test.kafka.topic
    await checkpoints.advance("order_search", [PartitionProgress(topic, 0, 1, 1, None)], 1)

    search = await _status_of(settings_for_test, resources, "order_search")
    assert not search.error_current and search.last_error is not None
    assert search.recovered_at == search.updated_at
    assert search.last_error_at is not None and search.recovered_at is not None
    assert search.recovered_at > search.last_error_at


class _RacedOnce:
    """A real store whose first set-up fails as a daemon racing another one used to."""

    def __init__(self, store: ProjectionStore) -> None:
        self._store = store
        self.setups = 0

    async def setup(self) -> None:
        self.setups += 1
        if self.setups == 1:
            raise asyncpg.UniqueViolationError(_RACE)
        await self._store.setup()

    async def apply(self, items: Sequence[Projected]) -> int:
        return await self._store.apply(items)

    async def close(self) -> None:
        await self._store.close()


async def test_a_lane_that_recovers_during_set_up_is_not_shown_failing(
    settings_for_test: Settings, pool: asyncpg.Pool, resources: Resources
) -> None:
    projection, store = next(
        (p, s) for p, s in APP.projections(resources) if p.name == "order_details"
    )
    raced = _RacedOnce(store)
    runner = settings_for_test.runner.model_copy(
        update={"backoff_initial_s": 0.01, "backoff_max_s": 0.01}
    )
    lane = Lane(
        projection,
        raced,  # type: ignore[arg-type]
        settings=runner,
        dead_letters=DeadLetterStore(pool),
        checkpoints=CheckpointStore(pool),
    )
    task = asyncio.create_task(lane.run())
    try:
        await asyncio.wait_for(lane.ready.wait(), timeout=30)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert raced.setups == 2

    status = await _status_of(settings_for_test, resources, "order_details")
    assert status.last_error is not None and "pg_type_typname_nsp_index" in status.last_error
    assert not status.error_current and status.healthy
