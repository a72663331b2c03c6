"""The demo sample's plan (pure data): legal per the rules, deterministic, safe to rerun."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import Command, ValidationFailedError
from engine.demo import DemoSize
from projections.orders import CreateOrder
from projections.orders.demo import (
    STEP_TARGET,
    OrderPlan,
    SamplePlan,
    Step,
    plan_sample,
    summarize,
)
from projections.orders.demo_data import CATALOG
from projections.orders.rules import OrderStatus, check_address_change, check_transition

seeds = st.integers(min_value=0, max_value=2**32)
sizes = st.builds(
    DemoSize, customers=st.integers(min_value=1, max_value=30), orders=st.integers(0, 60)
)


def _replay(order: OrderPlan) -> OrderStatus:
    """Walk the order's steps through the domain's rules; raises on any illegal one."""
    status = OrderStatus.PENDING
    for step in order.steps:
        target = STEP_TARGET[step]
        if target is None:
            check_address_change(str(order.order_id), status)
        else:
            check_transition(str(order.order_id), status, target)
            status = target
    return status


def _payloads(plan: SamplePlan) -> dict[str, str]:
    """Every command of the plan by id, with what it says (type and content)."""
    found: dict[str, str] = {}
    for wave in plan.waves():
        for command in wave:
            body = command.model_dump_json(exclude={"command_id"})
            found[str(command.command_id)] = f"{type(command).__name__}:{body}"
    return found


@settings(max_examples=40, deadline=None)
@given(size=sizes, seed=seeds)
def test_every_planned_step_is_legal_and_ends_in_the_planned_status(
    size: DemoSize, seed: int
) -> None:
    for order in plan_sample(size, seed).orders:
        assert _replay(order) is order.final_status
        assert 1 <= len(order.items) <= 5
        assert len({product for product, _ in order.items}) == len(order.items)


@settings(max_examples=20, deadline=None)
@given(size=sizes, seed=seeds)
def test_the_same_seed_gives_the_same_plan(size: DemoSize, seed: int) -> None:
    assert plan_sample(size, seed) == plan_sample(size, seed)
    assert _payloads(plan_sample(size, seed)) == _payloads(plan_sample(size, seed))


@settings(max_examples=30, deadline=None)
@given(first=sizes, second=sizes, seed=seeds)
def test_other_sizes_never_reuse_a_command_id_for_other_content(
    first: DemoSize, second: DemoSize, seed: int
) -> None:
    # The bus refuses a known command id with new content; a rerun with other
    # sizes must only repeat commands exactly or send new ones.
    a, b = _payloads(plan_sample(first, seed)), _payloads(plan_sample(second, seed))
    assert all(a[command_id] == b[command_id] for command_id in a.keys() & b.keys())


def test_a_larger_sample_keeps_the_smaller_ones_customers_and_orders() -> None:
    small = plan_sample(DemoSize(customers=30, orders=40), seed=3)
    large = plan_sample(DemoSize(customers=30, orders=90), seed=3)
    assert large.customers == small.customers
    assert large.orders[:40] == small.orders


def test_command_ids_and_emails_are_unique_within_and_across_seeds() -> None:
    plans = [plan_sample(DemoSize(customers=200, orders=300), seed) for seed in (1, 2)]
    ids = [command.command_id for plan in plans for wave in plan.waves() for command in wave]
    # Products are shared by every seed: the same commands, sent again.
    assert len(set(ids)) == len(ids) - len(CATALOG)
    emails = [c.email.lower() for plan in plans for c in plan.customers]
    assert len(set(emails)) == len(emails)
    assert {c.name for c in plans[0].customers} != {c.name for c in plans[1].customers}


def test_waves_touch_each_order_at_most_once_and_create_it_first() -> None:
    plan = plan_sample(DemoSize(customers=50, orders=200), seed=11)
    waves = plan.waves()
    assert len(waves[0]) == len(CATALOG) and len(waves[1]) == 50
    assert all(isinstance(command, CreateOrder) for command in waves[2])
    for wave in waves[3:]:
        touched = [_order_of(command) for command in wave]
        assert len(set(touched)) == len(touched)
    steps = sum(len(order.steps) for order in plan.orders)
    assert sum(map(len, waves)) == len(CATALOG) + 50 + 200 + steps


def _order_of(command: Command) -> str:
    order_id = getattr(command, "order_id", None)
    assert order_id is not None, command
    return str(order_id)


def test_proportions_look_like_a_real_shop() -> None:
    plan = plan_sample(DemoSize(customers=1000, orders=4000), seed=42)
    by_status = Counter(order.final_status for order in plan.orders)
    share = {status: by_status[status] / len(plan.orders) for status in OrderStatus}
    assert 0.55 < share[OrderStatus.DELIVERED] < 0.70
    assert 0.10 < share[OrderStatus.CANCELLED] < 0.20
    assert all(share[status] > 0.03 for status in OrderStatus)
    changed = sum(Step.CHANGE_ADDRESS in order.steps for order in plan.orders)
    assert 0.05 < changed / len(plan.orders) < 0.11
    per_customer = Counter(order.customer for order in plan.orders)
    # A few regulars with many orders; some customers have none yet.
    assert max(per_customer.values()) >= 4 * (len(plan.orders) / len(plan.customers))
    assert len(per_customer) < len(plan.customers)
    assert len({c.home.city for c in plan.customers}) >= 20


def test_summary_counts_match_the_plan_and_samples_point_into_it() -> None:
    plan = plan_sample(DemoSize(customers=40, orders=120), seed=5)
    summary = summarize(plan, commands=10, new=7)
    assert (summary.new, summary.duplicates) == (7, 3)
    assert sum(summary.breakdowns["orders_by_status"].values()) == 120
    sample = next(o for o in plan.orders if str(o.order_id) == summary.samples["order_id"])
    customer = plan.customers[sample.customer]
    assert str(customer.customer_id) == summary.samples["customer_id"]
    assert customer.name == summary.samples["customer_name"]
    assert sample.final_city == summary.samples["city"]


def test_orders_without_customers_are_refused() -> None:
    with pytest.raises(ValidationFailedError, match="customers"):
        plan_sample(DemoSize(customers=0, orders=1), seed=1)
