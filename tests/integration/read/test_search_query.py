"""Order search against the real Elasticsearch index that the ``order_search`` projection fills.

Six orders are folded by the real projection into the real store (events with
known times, so dates and sorts are predictable), then searched through the
alias, as readers do.
"""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
from elasticsearch import ApiError, AsyncElasticsearch

from engine import (
    DomainEvent,
    ElasticsearchDocumentStore,
    EngineError,
    EventEnvelope,
    Projected,
    Resources,
    ServiceUnavailableError,
    TransientError,
)
from projections.orders.commands import Address
from projections.orders.events import (
    OrderCancelled,
    OrderConfirmed,
    OrderCreated,
    OrderDelivered,
    OrderLine,
    OrderShipped,
    ShippingAddressChanged,
)
from projections.orders.rules import OrderStatus
from projections.orders.search import (
    OrderSearchPage,
    OrderSearchQuery,
    SortDirection,
    SortField,
    search_orders,
)
from projections.orders.views import OrderSearch
from projections.orders.wiring import search_alias

S = OrderStatus


def _at(day: int, hour: int = 0) -> datetime:
    return datetime(2026, 3, day, hour, tzinfo=UTC)


@dataclass(frozen=True)
class Order:
    """One order's life: created with these lines, then walked through ``steps``."""

    key: str
    customer: str
    products: tuple[tuple[str, str], ...]  # (name, price), one of each
    city: str
    created: datetime
    steps: tuple[tuple[OrderStatus, datetime], ...] = ()
    moved_to: tuple[str, datetime] | None = None  # a later shipping address change

    @property
    def total(self) -> Decimal:
        return sum((Decimal(price) for _, price in self.products), Decimal("0.00"))


ORDERS = (
    Order(
        "ada_london",
        "Ada Lovelace",
        (("Difference Engine", "19.99"), ("Punch Card", "5.01")),
        "London",
        _at(1, 9),
    ),
    Order(
        "alan_paris",
        "Alan Turing",
        (("Enigma Rotor", "42.50"),),
        "Paris",
        _at(1, 15),
        ((S.CONFIRMED, _at(10)),),
    ),
    Order(
        "grace_oslo",
        "Grace Hopper",
        (("Jacquard Loom", "5.00"),),
        "Berlin",
        _at(2, 10),
        ((S.CONFIRMED, _at(2, 12)), (S.SHIPPED, _at(6))),
        moved_to=("Oslo", _at(2, 11)),
    ),
    Order(
        "ada_lisbon",
        "Ada Lovelace",
        (("Enigma Rotor", "42.50"), ("Jacquard Loom", "57.49")),
        "Lisbon",
        _at(3, 8),
        ((S.CONFIRMED, _at(3, 9)), (S.SHIPPED, _at(3, 10)), (S.DELIVERED, _at(4, 9))),
    ),
    Order(
        "zoe",
        "Zoë Ŝtraße",
        (("Café Crème", "7.00"), ("東京 Guide", "5.00")),
        "São Paulo",
        _at(4, 12),
        ((S.CANCELLED, _at(4, 13)),),
    ),
    Order(
        "cpp",
        "Bjarne O'Neil",
        (("C++ Primer: 5th Ed.", "60.00"),),
        "New York",
        _at(5),
    ),
)
ALL = frozenset(order.key for order in ORDERS)
IDS = {order.key: str(uuid.uuid5(uuid.NAMESPACE_URL, f"order/{order.key}")) for order in ORDERS}
KEYS = {order_id: key for key, order_id in IDS.items()}

# Text full of query syntax, and the orders it genuinely names (by its plain words only).
SYNTAX_TEXTS: tuple[tuple[str, frozenset[str]], ...] = tuple(
    (text, frozenset(expected))
    for text, expected in (
        *((char, ()) for char in '*?()":\\/~^[]{}'),
        ("OR", ()),
        ("AND", ()),
        ("NOT", ()),
        ("*:*", ()),
        ("_all", ()),
        ("customer_name:*", ()),
        ("customer_name:Ada", ()),  # one word to the analyzer, not a field query
        ("status:DELIVERED", ()),
        ("status:DELIVERED OR *", ()),
        ("Ada OR Alan", ()),  # "or" is a word that must appear, not an operator
        ("NOT Ada", ()),
        ("Lov*", ()),  # no prefix expansion
        ("Adb~", ()),  # no fuzzy matching
        ("Lovelace^10", ()),
        ("[0 TO *]", ()),
        ('{"match_all": {}}', ()),
        ("<script>", ()),
        ("<script>alert(1)</script>", ()),
        ("🚀", ()),
        ("*?:()" * 40, ()),
        ("Ada*", ("ada_london", "ada_lisbon")),
        ("(Ada)", ("ada_london", "ada_lisbon")),
        ('"Ada Lovelace"', ("ada_london", "ada_lisbon")),
        ("Ada~", ("ada_london", "ada_lisbon")),
        ("Lovelace^", ("ada_london", "ada_lisbon")),
        ("Ada\x00", ("ada_london", "ada_lisbon")),
        ("C++", ("cpp",)),
        ("C++ Primer: 5th", ("cpp",)),
        ("O'Neil", ("cpp",)),
        ("\\Enigma/", ("alan_paris", "ada_lisbon")),
        ("東京", ("zoe",)),
        ("Zoë", ("zoe",)),
    )
)


def _created(order: Order) -> OrderCreated:
    lines = [
        OrderLine(
            product_id=f"p-{name}",
            product_name=name,
            quantity=1,
            unit_price=Decimal(price),
            line_total=Decimal(price),
        )
        for name, price in order.products
    ]
    return OrderCreated(
        order_id=IDS[order.key],
        customer_id=f"c-{order.customer}",
        customer_name=order.customer,
        customer_email="someone@example.com",
        items=lines,
        item_count=len(lines),
        total=order.total,
        shipping_address=_address(order.city),
    )


def _address(city: str) -> Address:
    return Address(street="1 Way", city=city, postal_code="1000", country="EU")


def _status_event(order: Order, previous: OrderStatus, status: OrderStatus) -> DomainEvent:
    common: dict[str, Any] = {
        "order_id": IDS[order.key],
        "customer_id": f"c-{order.customer}",
        "total": order.total,
        "previous_status": previous,
        "status": status,
    }
    if status is S.SHIPPED:
        return OrderShipped(**common, tracking_number="T-1", carrier="DHL")
    if status is S.CANCELLED:
        return OrderCancelled(**common, reason="customer request")
    return (OrderConfirmed if status is S.CONFIRMED else OrderDelivered)(**common)


def _history(order: Order) -> list[tuple[DomainEvent, datetime]]:
    events: list[tuple[DomainEvent, datetime]] = [(_created(order), order.created)]
    if order.moved_to is not None:
        city, at = order.moved_to
        events.append(
            (ShippingAddressChanged(order_id=IDS[order.key], shipping_address=_address(city)), at)
        )
    previous = S.PENDING
    for status, at in order.steps:
        events.append((_status_event(order, previous, status), at))
        previous = status
    return sorted(events, key=lambda pair: pair[1])


def _projected(order: Order, first_position: int) -> list[Projected]:
    return [
        Projected(
            EventEnvelope(
                event_id=uuid.uuid4(),
                event_type=event.event_type,
                schema_version=event.schema_version,
                aggregate_type="order",
                aggregate_id=IDS[order.key],
                aggregate_version=version,
                position=first_position + version,
                occurred_at=at,
                correlation_id=uuid.uuid4(),
                causation_id=uuid.uuid4(),
                payload=event.model_dump(mode="json"),
            ),
            event,
        )
        for version, (event, at) in enumerate(_history(order), start=1)
    ]


@pytest.fixture
async def indexed(resources: Resources) -> tuple[AsyncElasticsearch, str]:
    """The six orders, folded by the real projection into the real index, searchable."""
    alias = search_alias(resources)
    store = ElasticsearchDocumentStore(
        resources.elasticsearch, OrderSearch(), alias, OrderSearch.MAPPINGS
    )
    await store.setup()
    items = [item for n, order in enumerate(ORDERS) for item in _projected(order, n * 100)]
    assert await store.apply(items) == len(ORDERS)  # one document per order
    await resources.elasticsearch.indices.refresh(index=alias)
    return resources.elasticsearch, alias


async def _search(indexed: tuple[AsyncElasticsearch, str], **query: Any) -> OrderSearchPage:
    es, alias = indexed
    return await search_orders(es, alias, OrderSearchQuery.model_validate(query))


def _keys(page: OrderSearchPage) -> list[str]:
    return [KEYS[hit.order_id] for hit in page.hits]


async def _found(indexed: tuple[AsyncElasticsearch, str], **query: Any) -> set[str]:
    page = await _search(indexed, size=100, **query)
    assert page.total == len(page.hits)
    return set(_keys(page))


# --- free text -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Ada", {"ada_london", "ada_lisbon"}),
        ("lovelace", {"ada_london", "ada_lisbon"}),
        ("Enigma", {"alan_paris", "ada_lisbon"}),
        ("rotor ENIGMA", {"alan_paris", "ada_lisbon"}),
        ("punch card", {"ada_london"}),
        ("Oslo", {"grace_oslo"}),
        ("Berlin", set()),  # the address changed: the projection path is the real one
        ("Ada London", {"ada_london"}),  # every word, each in any of the fields
        ("Ada Paris", set()),
        ("São Paulo", {"zoe"}),
        ("crème", {"zoe"}),
        ("new york", {"cpp"}),
    ],
)
async def test_text_matches_customer_products_and_city(
    indexed: tuple[AsyncElasticsearch, str], text: str, expected: set[str]
) -> None:
    assert await _found(indexed, text=text) == expected


async def test_query_syntax_in_text_is_plain_words_and_never_errors(
    indexed: tuple[AsyncElasticsearch, str],
) -> None:
    wrong = {}
    for text, expected in SYNTAX_TEXTS:
        found = await _found(indexed, text=text)
        if found != expected:
            wrong[text] = sorted(found)
    assert wrong == {}


@pytest.mark.parametrize("text", ["", "   ", "\t\n", "\u00a0"])
async def test_blank_text_is_no_text(indexed: tuple[AsyncElasticsearch, str], text: str) -> None:
    assert await _found(indexed, text=text) == ALL


# --- filters -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"status": "PENDING"}, {"ada_london", "cpp"}),
        ({"status": ["SHIPPED", "DELIVERED"]}, {"grace_oslo", "ada_lisbon"}),
        ({"status": ["CONFIRMED"], "text": "Ada"}, set()),
        ({"status": ["DELIVERED"], "text": "Ada"}, {"ada_lisbon"}),
        ({"min_total": "12", "max_total": "60"}, {"ada_london", "alan_paris", "zoe", "cpp"}),
        ({"min_total": "99.99"}, {"ada_lisbon"}),
        ({"max_total": "5"}, {"grace_oslo"}),
        ({"created_from": "2026-03-01", "created_to": "2026-03-01"}, {"ada_london", "alan_paris"}),
        ({"created_to": date(2026, 3, 2)}, {"ada_london", "alan_paris", "grace_oslo"}),
        ({"created_from": "2026-03-04"}, {"zoe", "cpp"}),
        (
            {"created_from": "2026-03-01T15:00:00Z", "created_to": "2026-03-02T10:00:00Z"},
            {"alan_paris", "grace_oslo"},
        ),
        # Offsets count, and a naive time is UTC: 15:00Z to 16:00Z, then 14:00Z to 14:59:59Z.
        (
            {"created_from": "2026-03-01T16:00:00+01:00", "created_to": "2026-03-01T16:00"},
            {"alan_paris"},
        ),
        ({"created_from": "2026-03-01T16:00:00+02:00", "created_to": "2026-03-01T14:59:59"}, set()),
        (
            {"text": "Jacquard", "created_to": "2026-03-03", "status": ["SHIPPED", "DELIVERED"]},
            {"grace_oslo", "ada_lisbon"},
        ),
    ],
)
async def test_filters(
    indexed: tuple[AsyncElasticsearch, str], query: dict[str, Any], expected: set[str]
) -> None:
    assert await _found(indexed, **query) == expected


# --- results, sorting, paging ------------------------------------------------------------


async def test_a_hit_carries_the_order_as_projected(
    indexed: tuple[AsyncElasticsearch, str],
) -> None:
    page = await _search(indexed, text="Lisbon", sort="total")
    [hit] = page.hits
    assert hit.order_id == IDS["ada_lisbon"]
    assert hit.customer_id == "c-Ada Lovelace"
    assert hit.customer_name == "Ada Lovelace"
    assert hit.city == "Lisbon"
    assert hit.status is S.DELIVERED
    assert hit.total == Decimal("99.99")
    assert hit.item_count == 2
    assert hit.created_at == _at(3, 8)
    assert hit.updated_at == _at(4, 9)
    assert hit.score is None  # sorted by total, not by relevance
    assert (page.total, page.page, page.size) == (1, 1, 20)


@pytest.mark.parametrize(
    ("sort", "direction", "expected"),
    [
        (
            SortField.TOTAL,
            SortDirection.ASC,
            ["grace_oslo", "zoe", "ada_london", "alan_paris", "cpp", "ada_lisbon"],
        ),
        (
            SortField.TOTAL,
            SortDirection.DESC,
            ["ada_lisbon", "cpp", "alan_paris", "ada_london", "zoe", "grace_oslo"],
        ),
        (
            SortField.CREATED_AT,
            SortDirection.DESC,
            ["cpp", "zoe", "ada_lisbon", "grace_oslo", "alan_paris", "ada_london"],
        ),
        (
            SortField.CREATED_AT,
            SortDirection.ASC,
            ["ada_london", "alan_paris", "grace_oslo", "ada_lisbon", "zoe", "cpp"],
        ),
        (
            SortField.UPDATED_AT,
            SortDirection.ASC,
            ["ada_london", "ada_lisbon", "zoe", "cpp", "grace_oslo", "alan_paris"],
        ),
        # No text: every score is equal, so relevance falls back to newest first.
        (
            SortField.RELEVANCE,
            SortDirection.DESC,
            ["cpp", "zoe", "ada_lisbon", "grace_oslo", "alan_paris", "ada_london"],
        ),
    ],
)
async def test_sorting(
    indexed: tuple[AsyncElasticsearch, str],
    sort: SortField,
    direction: SortDirection,
    expected: list[str],
) -> None:
    page = await _search(indexed, sort=sort, direction=direction)
    assert _keys(page) == expected


async def test_relevance_puts_the_best_match_first_with_scores(
    indexed: tuple[AsyncElasticsearch, str],
) -> None:
    page = await _search(indexed, text="Enigma Rotor")
    scores = [hit.score for hit in page.hits if hit.score is not None]
    assert set(_keys(page)) == {"alan_paris", "ada_lisbon"}
    assert len(scores) == 2
    assert all(score > 0 for score in scores)
    assert scores == sorted(scores, reverse=True)
    ascending = await _search(indexed, text="Enigma Rotor", direction="asc")
    assert [hit.score for hit in ascending.hits] == scores[::-1]


@pytest.mark.parametrize("sort", [SortField.RELEVANCE, SortField.TOTAL])
async def test_pages_cover_every_match_once_with_the_exact_total(
    indexed: tuple[AsyncElasticsearch, str], sort: SortField
) -> None:
    everything = _keys(await _search(indexed, sort=sort, size=100))
    pages = [await _search(indexed, sort=sort, size=4, page=n) for n in (1, 2, 3)]
    assert [len(page.hits) for page in pages] == [4, 2, 0]
    assert [page.total for page in pages] == [6, 6, 6]
    assert [(page.page, page.size) for page in pages] == [(1, 4), (2, 4), (3, 4)]
    assert [key for page in pages for key in _keys(page)] == everything
    assert sorted(everything) == sorted(ALL)


async def test_total_counts_matches_beyond_the_page(
    indexed: tuple[AsyncElasticsearch, str],
) -> None:
    page = await _search(indexed, text="Ada", size=1)
    assert (page.total, len(page.hits)) == (2, 1)


# --- failures ----------------------------------------------------------------------------


async def test_a_missing_index_is_a_typed_error(resources: Resources) -> None:
    query = OrderSearchQuery(text="Ada")
    with pytest.raises(ServiceUnavailableError) as error:
        await search_orders(resources.elasticsearch, search_alias(resources), query)
    assert "does not exist yet" in str(error.value)
    assert search_alias(resources) in str(error.value)


async def test_an_index_without_the_mappings_is_a_typed_error(resources: Resources) -> None:
    # E.g. an alias pointed by hand at the wrong index: nothing to sort on.
    alias = search_alias(resources)
    await resources.elasticsearch.indices.create(index=alias)
    with pytest.raises(EngineError) as error:
        await search_orders(resources.elasticsearch, alias, OrderSearchQuery(sort="total"))
    assert not isinstance(error.value, TransientError)
    assert "rejected an order search" in str(error.value)
    assert isinstance(error.value.__cause__, ApiError)


async def test_an_unreachable_elasticsearch_is_a_typed_error() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    es = AsyncElasticsearch(f"http://127.0.0.1:{port}", max_retries=0, request_timeout=5)
    try:
        with pytest.raises(ServiceUnavailableError) as error:
            await search_orders(es, "engine-orders", OrderSearchQuery())
    finally:
        await es.close()
    assert error.value.service == "Elasticsearch"
    assert str(port) in error.value.address
