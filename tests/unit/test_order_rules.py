"""Property tests of the orders domain's rules (pure functions, no I/O)."""

from __future__ import annotations

import itertools
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import RuleViolationError
from projections.orders.rules import (
    ADDRESS_CHANGEABLE,
    TRANSITIONS,
    InvalidTransitionError,
    OrderStatus,
    ProductInfo,
    check_address_change,
    check_transition,
    order_total,
    price_lines,
)

statuses = st.sampled_from(list(OrderStatus))
TERMINAL = {OrderStatus.DELIVERED, OrderStatus.CANCELLED}
FORWARD = [OrderStatus.PENDING, OrderStatus.CONFIRMED, OrderStatus.SHIPPED, OrderStatus.DELIVERED]


def _apply(history: list[OrderStatus]) -> tuple[OrderStatus, list[OrderStatus]]:
    """Apply requested targets from PENDING, keeping the ones the rules accept."""
    current, accepted = OrderStatus.PENDING, []
    for target in history:
        try:
            check_transition("o", current, target)
        except InvalidTransitionError as exc:
            assert (exc.current, exc.target) == (current, target)
            continue
        current = target
        accepted.append(target)
    return current, accepted


@given(st.lists(statuses, max_size=30))
def test_any_request_sequence_moves_only_forward_and_stops_at_a_terminal(
    requests: list[OrderStatus],
) -> None:
    final, accepted = _apply(requests)
    path = [OrderStatus.PENDING, *accepted]
    for before, after in itertools.pairwise(path):
        assert after in TRANSITIONS[before]
        assert before not in TERMINAL
    if OrderStatus.CANCELLED in path:
        assert path[-1] == OrderStatus.CANCELLED
        assert OrderStatus.SHIPPED not in path  # cancel only before shipping
    else:
        assert path == FORWARD[: len(path)]
    assert final == path[-1]


@given(statuses, statuses)
def test_a_refused_transition_names_both_states(current: OrderStatus, target: OrderStatus) -> None:
    if target in TRANSITIONS[current]:
        check_transition("o-7", current, target)
        return
    with pytest.raises(InvalidTransitionError) as caught:
        check_transition("o-7", current, target)
    assert current.value in str(caught.value) and target.value in str(caught.value)


@given(statuses)
def test_cancel_is_allowed_exactly_before_delivery_and_shipping(status: OrderStatus) -> None:
    allowed = OrderStatus.CANCELLED in TRANSITIONS[status]
    assert allowed == (status in {OrderStatus.PENDING, OrderStatus.CONFIRMED})


@given(statuses)
def test_address_changes_only_before_shipping(status: OrderStatus) -> None:
    if status in ADDRESS_CHANGEABLE:
        check_address_change("o", status)
    else:
        with pytest.raises(RuleViolationError):
            check_address_change("o", status)
    assert (status in ADDRESS_CHANGEABLE) == (
        status in {OrderStatus.PENDING, OrderStatus.CONFIRMED}
    )


prices = st.decimals(min_value=Decimal("0.01"), max_value=Decimal("9999.99"), places=2)


@given(
    st.dictionaries(st.sampled_from("abcdef"), prices, min_size=1),
    st.data(),
)
def test_totals_come_from_the_catalog_whatever_the_item_order(
    catalog_prices: dict[str, Decimal], data: st.DataObject
) -> None:
    catalog = {pid: ProductInfo(f"product {pid}", price) for pid, price in catalog_prices.items()}
    requested = data.draw(
        st.lists(st.tuples(st.sampled_from(sorted(catalog)), st.integers(1, 1000)), min_size=1)
    )
    lines = price_lines(requested, catalog)
    expected = sum((catalog[p].price * q for p, q in requested), Decimal("0"))
    assert order_total(lines) == expected
    assert order_total(price_lines(list(reversed(requested)), catalog)) == expected
    assert len({line.product_id for line in lines}) == len(lines)  # one line per product
    assert sum(line.quantity for line in lines) == sum(q for _, q in requested)
