"""A test kit for your own projections and command handlers.

Projections, in memory through the engine's own fold, then in the real store::

    from engine.testing import CommandScenario, assert_idempotent, given, project, project_into

    stream = given(OrderCreated(...), OrderConfirmed(...), aggregate_id="o1", registry=registry)
    docs = project(OrderDetails(), stream)               # {"o1": {...}}, as the daemon folds it
    assert docs["o1"]["status"] == "CONFIRMED"
    assert_idempotent(OrderDetails(), stream)            # redelivery and batching change nothing
    await project_into((stats, PostgresSqlStore(pool, stats)), stream)   # then query the store

    scenario = CommandScenario(pool, APP, settings.postgres)   # a migrated test database
    await scenario.given(RegisterCustomer(...), RegisterProduct(...), CreateOrder(...))
    (await scenario.when(ShipOrder(order_id=...))).expect_error(InvalidTransitionError)

``EventStream`` builds histories over several aggregates (``.add(id, *events)``).
Nothing here mocks a service: stores and the command bus are the real ones.
"""

from engine.testing.projections import as_redis_hash, assert_idempotent, project, project_into
from engine.testing.scenario import CommandScenario, Outcome
from engine.testing.streams import EventStream, given

__all__ = [
    "CommandScenario",
    "EventStream",
    "Outcome",
    "as_redis_hash",
    "assert_idempotent",
    "given",
    "project",
    "project_into",
]
