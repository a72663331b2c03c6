"""The order search request body, built from validated queries (pure: no Elasticsearch)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from engine import ValidationFailedError
from projections.orders.rules import OrderStatus
from projections.orders.search import (
    MAX_PAGE_SIZE,
    MAX_RESULT_WINDOW,
    MAX_TEXT_LENGTH,
    TEXT_FIELDS,
    OrderSearchQuery,
    SortDirection,
    SortField,
    build_search_body,
    parse_search_query,
)

SYNTAX_TEXTS = (
    "*",
    "?",
    "OR",
    "AND",
    "NOT",
    "(",
    ")",
    '"',
    ":",
    "\\",
    "/",
    "~",
    "^",
    "[",
    "]",
    "{",
    "}",
    "customer_name:*",
    "status:DELIVERED OR *",
    "<script>alert(1)</script>",
    'Ada" OR "1"="1',
    "name:(Ada OR Alan) AND total:[0 TO *]",
    "Zoë 東京 🚀",
)

Path = tuple[str | int, ...]
_NOT_TEXT = object()


def _leaves(node: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaves(value, (*path, index))
    else:
        yield path, node


def _keys(node: Any) -> set[str]:
    return {str(part) for path, _ in _leaves(node) for part in path}


def _filters(query: OrderSearchQuery) -> list[dict[str, Any]]:
    filters: list[dict[str, Any]] = build_search_body(query)["query"]["bool"]["filter"]
    return filters


# --- user text ---------------------------------------------------------------------------


@given(st.text(max_size=MAX_TEXT_LENGTH) | st.sampled_from(SYNTAX_TEXTS))
def test_user_text_only_ever_becomes_one_multi_match_query(text: str) -> None:
    query = OrderSearchQuery(text=text)
    body = build_search_body(query)
    json.loads(json.dumps(body, allow_nan=False))  # plain JSON, nothing exotic
    assert not {"query_string", "simple_query_string"} & _keys(body)
    if query.text is None:
        assert not text.strip()
        assert "must" not in body["query"]["bool"]
        return
    assert query.text == text.strip()
    # Put something no text can equal in its place: exactly one leaf of the body changes.
    other = dict(_leaves(build_search_body(query.model_copy(update={"text": _NOT_TEXT}))))
    changed = [(path, value) for path, value in _leaves(body) if other.get(path) != value]
    assert changed == [(("query", "bool", "must", 0, "multi_match", "query"), text.strip())]


@pytest.mark.parametrize("text", SYNTAX_TEXTS)
def test_syntax_characters_are_passed_as_words_to_find(text: str) -> None:
    body = build_search_body(OrderSearchQuery(text=text))
    assert body["query"]["bool"]["must"] == [
        {
            "multi_match": {
                "query": text,
                "fields": list(TEXT_FIELDS),
                "type": "cross_fields",
                "operator": "and",
                "zero_terms_query": "none",
            }
        }
    ]
    assert "query_string" not in json.dumps(body)


@pytest.mark.parametrize("text", ["", " ", "\t\n  ", "\u00a0\u2003"])
def test_blank_text_is_no_text(text: str) -> None:
    query = OrderSearchQuery(text=text)
    assert query.text is None
    assert build_search_body(query)["query"] == {"bool": {"filter": []}}


def test_text_is_limited_in_length_and_must_be_valid_unicode() -> None:
    assert OrderSearchQuery(text="x" * MAX_TEXT_LENGTH).text == "x" * MAX_TEXT_LENGTH
    with pytest.raises(ValidationFailedError) as long:
        parse_search_query({"text": "x" * (MAX_TEXT_LENGTH + 1)})
    assert long.value.field == "text"
    with pytest.raises(ValidationFailedError) as broken:
        parse_search_query({"text": json.loads('"Ada \\ud800"')})
    assert broken.value.field == "text"
    assert "unicode" in broken.value.problem  # a lone surrogate has no UTF-8 form to send


# --- filters -------------------------------------------------------------------------------


def test_no_filters_and_no_text_match_everything() -> None:
    body = build_search_body(OrderSearchQuery())
    assert body["query"] == {"bool": {"filter": []}}
    assert body["track_total_hits"] is True
    assert (body["from"], body["size"]) == (0, 20)


def test_status_accepts_one_or_several_and_filters_on_exact_values() -> None:
    assert _filters(OrderSearchQuery.model_validate({"status": "SHIPPED"})) == [
        {"terms": {"status": ["SHIPPED"]}}
    ]
    several = OrderSearchQuery.model_validate({"status": ["SHIPPED", "PENDING", "SHIPPED"]})
    assert several.status == {OrderStatus.SHIPPED, OrderStatus.PENDING}
    assert _filters(several) == [{"terms": {"status": ["PENDING", "SHIPPED"]}}]
    with pytest.raises(ValidationFailedError) as bad:
        parse_search_query({"status": ["SHIPPED", "LOST"]})
    assert bad.value.field == "status.1"


def test_total_range_is_inclusive_and_validated() -> None:
    query = OrderSearchQuery(min_total=Decimal("10"), max_total=Decimal("99.99"))
    assert _filters(query) == [{"range": {"total": {"gte": 10.0, "lte": 99.99}}}]
    assert _filters(OrderSearchQuery(max_total=Decimal("5"))) == [
        {"range": {"total": {"lte": 5.0}}}
    ]
    assert _filters(OrderSearchQuery(min_total=Decimal("7"), max_total=Decimal("7"))) == [
        {"range": {"total": {"gte": 7.0, "lte": 7.0}}}
    ]
    for bad, field in (
        ({"min_total": "-0.01"}, "min_total"),
        ({"max_total": "-1"}, "max_total"),
        ({"min_total": "10", "max_total": "9.99"}, "max_total"),
        ({"min_total": "1e400"}, "min_total"),
        ({"max_total": "NaN"}, "max_total"),
        ({"min_total": "Infinity"}, "min_total"),
    ):
        with pytest.raises(ValidationFailedError) as error:
            parse_search_query(bad)
        assert error.value.field == field, bad


def test_a_date_range_covers_whole_days_in_utc() -> None:
    query = OrderSearchQuery(created_from=date(2026, 3, 1), created_to=date(2026, 3, 1))
    assert _filters(query) == [
        {
            "range": {
                "created_at": {
                    "gte": "2026-03-01T00:00:00+00:00",
                    "lt": "2026-03-02T00:00:00+00:00",
                }
            }
        }
    ]
    parsed = OrderSearchQuery.model_validate({"created_to": "2026-03-01"})
    assert parsed.created_to == date(2026, 3, 1)


def test_a_datetime_range_is_inclusive_and_naive_times_are_utc() -> None:
    paris = timezone(timedelta(hours=1))
    query = OrderSearchQuery(
        created_from=datetime(2026, 3, 1, 9, 30), created_to=datetime(2026, 3, 1, 18, tzinfo=paris)
    )
    assert _filters(query) == [
        {
            "range": {
                "created_at": {
                    "gte": "2026-03-01T09:30:00+00:00",
                    "lte": "2026-03-01T18:00:00+01:00",
                }
            }
        }
    ]
    instant = datetime(2026, 3, 1, 12, tzinfo=UTC)
    assert OrderSearchQuery(created_from=instant, created_to=instant).created_to == instant


@pytest.mark.parametrize(
    ("start", "end"),
    [
        ("2026-03-02", "2026-03-01"),
        ("2026-03-01T12:00:00Z", "2026-03-01T11:59:59Z"),
        ("2026-03-02T00:00:00Z", "2026-03-01"),  # the day ends before the start
        ("2026-03-01T10:00:00+02:00", "2026-03-01T07:59:00Z"),
    ],
)
def test_an_empty_date_range_is_refused(start: str, end: str) -> None:
    with pytest.raises(ValidationFailedError) as error:
        parse_search_query({"created_from": start, "created_to": end})
    assert error.value.field == "created_to"
    assert "before created_from" in error.value.problem


def test_filters_combine_with_text() -> None:
    query = OrderSearchQuery(
        text="Ada", status=frozenset({OrderStatus.DELIVERED}), min_total=Decimal(1)
    )
    body = build_search_body(query)
    assert body["query"]["bool"]["filter"] == [
        {"terms": {"status": ["DELIVERED"]}},
        {"range": {"total": {"gte": 1.0}}},
    ]
    assert body["query"]["bool"]["must"][0]["multi_match"]["query"] == "Ada"


# --- sorting and paging --------------------------------------------------------------------


def test_relevance_sorts_by_score_then_newest_then_id() -> None:
    assert build_search_body(OrderSearchQuery(text="Ada"))["sort"] == [
        {"_score": {"order": "desc"}},
        {"created_at": {"order": "desc"}},
        {"order_id": {"order": "asc"}},
    ]


@pytest.mark.parametrize("field", [SortField.CREATED_AT, SortField.TOTAL, SortField.UPDATED_AT])
@pytest.mark.parametrize("direction", list(SortDirection))
def test_field_sorts_follow_the_direction_with_a_stable_tiebreak(
    field: SortField, direction: SortDirection
) -> None:
    body = build_search_body(OrderSearchQuery(sort=field, direction=direction))
    assert body["sort"] == [
        {field.value: {"order": direction.value}},
        {"order_id": {"order": "asc"}},
    ]


@pytest.mark.parametrize(
    "bad",
    [
        {"sort": "customer_name"},
        {"sort": "_score"},
        {"sort": "total; DROP"},
        {"direction": "sideways"},
    ],
)
def test_only_the_allowed_sorts_are_accepted(bad: dict[str, str]) -> None:
    with pytest.raises(ValidationFailedError) as error:
        parse_search_query(bad)
    assert error.value.field == next(iter(bad))


def test_pages_become_offsets() -> None:
    body = build_search_body(OrderSearchQuery(page=3, size=25))
    assert (body["from"], body["size"]) == (50, 25)
    deepest = OrderSearchQuery(page=MAX_RESULT_WINDOW // MAX_PAGE_SIZE, size=MAX_PAGE_SIZE)
    assert build_search_body(deepest)["from"] + MAX_PAGE_SIZE == MAX_RESULT_WINDOW


@given(st.integers(-5, 20_000), st.integers(-5, 300))
def test_paging_is_valid_exactly_within_the_limits(page: int, size: int) -> None:
    allowed = page >= 1 and 1 <= size <= MAX_PAGE_SIZE and page * size <= MAX_RESULT_WINDOW
    try:
        query = OrderSearchQuery(page=page, size=size)
    except ValidationError:
        assert not allowed
    else:
        assert allowed
        body = build_search_body(query)
        assert body["from"] + body["size"] <= MAX_RESULT_WINDOW


def test_too_deep_a_page_says_why_and_names_the_page() -> None:
    with pytest.raises(ValidationFailedError) as error:
        parse_search_query({"page": 101, "size": 100})
    assert error.value.field == "page"
    assert str(MAX_RESULT_WINDOW) in error.value.problem
    assert "last page is 100" in error.value.problem
    with pytest.raises(ValidationFailedError) as big:
        parse_search_query({"size": MAX_PAGE_SIZE + 1})
    assert big.value.field == "size"
    for zero in ({"page": 0}, {"size": 0}):
        with pytest.raises(ValidationFailedError):
            parse_search_query(zero)


def test_extra_fields_are_forbidden() -> None:
    for extra in ({"query_string": "x"}, {"from": 0}, {"q": "Ada"}):
        with pytest.raises(ValidationFailedError) as error:
            parse_search_query(extra)
        assert error.value.field == next(iter(extra))
        assert "Extra inputs" in error.value.problem


def test_only_the_document_fields_are_fetched() -> None:
    source = build_search_body(OrderSearchQuery())["_source"]
    assert "_v" not in source
    assert {"order_id", "customer_name", "shipping_city", "total", "created_at"} <= set(source)
