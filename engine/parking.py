"""A lane's view of its parked aggregates: which events to park instead of applying.

See :mod:`engine.postgres.deadletters` for parking and why a parked event
cannot be lost to a concurrent replay. A lane keeps the set of aggregates
parked for its projection (its own parks and those of ``*``) in memory:
loaded from Postgres before its first batch and after a rebalance (another
daemon may have parked aggregates on the partitions it was given), and added
to by every park made on its behalf (its own dead letters, and the
dispatcher's, before it dispatches the batch). So the common case, nothing
parked, costs no query, and a lane whose store does not need Postgres keeps
applying through a Postgres outage (see :mod:`engine.lane`). Only an event of
an aggregate in the set is looked up, under lock, and parked or applied by
what Postgres says; an aggregate a replay has unparked meanwhile leaves the
set on that look-up.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from engine import metrics
from engine.deliveries import Delivery, aggregate_of, dead_letter, log_fields
from engine.postgres.deadletters import DeadLetterStore, NewDeadLetter
from engine.retry import Backoff, any_error, retrying

log = logging.getLogger("engine.runner")

T = TypeVar("T")


class ParkedAggregates:
    """The aggregates parked for one projection, and the check that parks events behind them."""

    def __init__(
        self, projection: str, dead_letters: DeadLetterStore, backoff: Callable[[], Backoff]
    ) -> None:
        self._projection = projection
        self._dead_letters = dead_letters
        self._backoff = backoff
        self._ids: set[str] | None = None  # None: to be loaded before the next check

    def note(self, aggregate_ids: Sequence[str]) -> None:
        """Aggregates parked on this projection's behalf."""
        if self._ids is not None:
            self._ids.update(aggregate_ids)

    def forget(self) -> None:
        """Load the set again before the next check (partitions were assigned)."""
        self._ids = None

    async def hold(self, deliveries: list[Delivery]) -> list[Delivery]:
        """Park the deliveries behind a dead letter of their aggregate; the ones to apply.

        Waits out a Postgres outage when it has to ask Postgres (loading the
        set, or an event of an aggregate in it): applying such an event
        unchecked could fold it over a hole, and skipping it would lose it.
        """
        if not deliveries:
            return deliveries
        if self._ids is None:
            self._ids = await self._retrying(
                functools.partial(self._dead_letters.parked_ids, self._projection)
            )
        parked = self._ids
        if not parked:  # the common case: nothing to look at, for any event
            return deliveries
        candidates = [self._letter(d) for d in deliveries if aggregate_of(d)[0] in parked]
        if not candidates:
            return deliveries
        parking = await self._retrying(lambda: self._dead_letters.park_behind(candidates))
        # Unparked by a replay since the set was loaded: no need to look them up again.
        parked -= {c.aggregate_id for c in candidates if c.aggregate_id} - parking.parked
        if parking.held:
            metrics.EVENTS_DEAD_LETTERED.labels(self._projection).inc(len(parking.held))
            for delivery in deliveries:
                if (delivery.tp.partition, delivery.offset) in parking.held:
                    aggregate_id, version = aggregate_of(delivery)
                    log.info(
                        "%s: parked %s v%s behind its dead-lettered event",
                        self._projection,
                        aggregate_id,
                        version,
                        extra=log_fields(delivery, self._projection),
                    )
        return [d for d in deliveries if (d.tp.partition, d.offset) not in parking.held]

    async def _retrying(self, step: Callable[[], Awaitable[T]]) -> T:
        async def warn(exc: Exception) -> None:
            log.warning("%s: cannot check or record parked events yet: %s", self._projection, exc)

        return await retrying(step, self._backoff(), retry_if=any_error, on_failure=warn)

    def _letter(self, delivery: Delivery) -> NewDeadLetter:
        aggregate_id, version = aggregate_of(delivery)
        return dead_letter(
            delivery,
            self._projection,
            f"parked: {aggregate_id} has an earlier event dead-lettered (this is v{version})",
            attempts=0,
        )
