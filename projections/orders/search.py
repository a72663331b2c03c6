"""Order search: free text, filters, sorting and paging over the ``order_search`` index.

The index is the one the :class:`~projections.orders.views.OrderSearch` projection
maintains, read through its alias (``search_alias(resources)``), so a rebuild that
switches the alias switches the readers too.

Why user text can never change the shape of a query: it only ever becomes the
``query`` value of one ``multi_match``, which analyzes it into plain terms (the
standard analyzer drops ``*``, ``:``, ``(`` ...). There is no ``query_string`` or
``simple_query_string`` anywhere, so ``status:DELIVERED OR *`` is three words to
look for, not a field query, a boolean operator and a wildcard. Every word must
appear (``operator: and``) in one of the searched fields (``cross_fields``), and a
text with no words at all matches nothing (``zero_terms_query: none``) rather than
everything. Whitespace-only text counts as no text.

Filters, sorts and paging are validated here before Elasticsearch sees them; the
depth limit is Elasticsearch's default ``index.max_result_window``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from elasticsearch import ApiError, AsyncElasticsearch, NotFoundError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from engine import (
    EngineError,
    ServiceUnavailableError,
    ValidationFailedError,
    elasticsearch_address,
    elasticsearch_errors,
)
from projections.orders.rules import OrderStatus

MAX_TEXT_LENGTH = 200
MAX_PAGE_SIZE = 100
# Elasticsearch refuses from + size beyond index.max_result_window (10 000 by default).
MAX_RESULT_WINDOW = 10_000

TEXT_FIELDS = ("customer_name", "product_names", "shipping_city")
_SOURCE_FIELDS = (
    "order_id",
    "customer_id",
    "customer_name",
    "shipping_city",
    "status",
    "total",
    "item_count",
    "created_at",
    "updated_at",
)
_CENT = Decimal("0.01")
# Totals are numeric(14, 2) on the write side; the bound also keeps floats finite.
MAX_TOTAL = Decimal("999999999999.99")


class SortField(enum.StrEnum):
    RELEVANCE = "relevance"
    CREATED_AT = "created_at"
    TOTAL = "total"
    UPDATED_AT = "updated_at"


class SortDirection(enum.StrEnum):
    ASC = "asc"
    DESC = "desc"


DateBound = date | datetime


class OrderSearchQuery(BaseModel):
    """One search request. Bounds are inclusive; a naive datetime is taken as UTC.

    A plain date as ``created_to`` includes that whole day (UTC).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str | None = Field(default=None, max_length=MAX_TEXT_LENGTH)
    status: frozenset[OrderStatus] = frozenset()
    min_total: Decimal | None = Field(default=None, ge=0, le=MAX_TOTAL)
    max_total: Decimal | None = Field(default=None, ge=0, le=MAX_TOTAL)
    # Order matters: a validator sees only the fields declared before its own.
    created_from: DateBound | None = None
    created_to: DateBound | None = None
    sort: SortField = SortField.RELEVANCE
    direction: SortDirection = SortDirection.DESC
    size: int = Field(default=20, ge=1, le=MAX_PAGE_SIZE)
    page: int = Field(default=1, ge=1)

    @field_validator("text", mode="before")
    @classmethod
    def _strip(cls, value: object) -> object:
        # Before the length check, and with Python's idea of whitespace (str.strip).
        return value.strip() if isinstance(value, str) else value

    @field_validator("text")
    @classmethod
    def _blank_is_no_text(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("status", mode="before")
    @classmethod
    def _one_or_several(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("max_total")
    @classmethod
    def _max_not_below_min(cls, value: Decimal | None, info: ValidationInfo) -> Decimal | None:
        low = info.data.get("min_total")
        if value is not None and low is not None and value < low:
            raise ValueError(f"must be at least min_total ({low})")
        return value

    @field_validator("created_to")
    @classmethod
    def _to_not_before_from(cls, value: DateBound | None, info: ValidationInfo) -> DateBound | None:
        start = info.data.get("created_from")
        if value is not None and start is not None and _empty_range(start, value):
            raise ValueError("must not be before created_from")
        return value

    @field_validator("page")
    @classmethod
    def _not_too_deep(cls, value: int, info: ValidationInfo) -> int:
        size = info.data.get("size")
        if size is not None and value * size > MAX_RESULT_WINDOW:
            raise ValueError(
                f"page * size must be at most {MAX_RESULT_WINDOW} (the deepest result "
                f"Elasticsearch serves); with size {size} the last page is "
                f"{MAX_RESULT_WINDOW // size}: narrow the search instead"
            )
        return value


class OrderSearchHit(BaseModel):
    """One order found; ``score`` is set only when the results are sorted by relevance."""

    model_config = ConfigDict(frozen=True)

    order_id: str
    customer_id: str
    customer_name: str
    city: str
    status: OrderStatus
    total: Decimal
    item_count: int
    created_at: datetime
    updated_at: datetime
    score: float | None = None


class OrderSearchPage(BaseModel):
    """One page of results; ``total`` is the exact number of orders that match."""

    model_config = ConfigDict(frozen=True)

    total: int
    page: int
    size: int
    hits: tuple[OrderSearchHit, ...]


def parse_search_query(data: Mapping[str, Any]) -> OrderSearchQuery:
    """Build a query from untrusted input; the first problem names its field."""
    try:
        return OrderSearchQuery.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or OrderSearchQuery.__name__
        raise ValidationFailedError(where, first["msg"]) from exc


def build_search_body(query: OrderSearchQuery) -> dict[str, Any]:
    """The Elasticsearch request body for ``query`` (pure: no I/O)."""
    bool_query: dict[str, Any] = {"filter": _filters(query)}
    if query.text is not None:
        bool_query["must"] = [_text_match(query.text)]
    return {
        "query": {"bool": bool_query},
        "sort": _sort(query),
        "from": (query.page - 1) * query.size,
        "size": query.size,
        "track_total_hits": True,
        "_source": list(_SOURCE_FIELDS),
    }


async def search_orders(
    es: AsyncElasticsearch, alias: str, query: OrderSearchQuery
) -> OrderSearchPage:
    """Run ``query`` against the order search index behind ``alias``.

    Elasticsearch down or refusing for a while becomes the engine's
    TransientError (naming the cluster's host:port, see ``elasticsearch_errors``);
    a missing index and a refused request are this module's to name.
    """
    try:
        with elasticsearch_errors(elasticsearch_address(es)):
            response = await es.search(index=alias, body=build_search_body(query))
    except NotFoundError as exc:
        raise ServiceUnavailableError(
            "the order search index",
            alias,
            "It does not exist yet: start the projection daemon (engine run) so that the "
            "order_search projection creates it",
        ) from exc
    except ApiError as exc:
        # Not the caller's input (that was validated): a mapping or body the index does not take.
        raise EngineError(f"Elasticsearch rejected an order search: {exc}") from exc
    return _page(query, response.body)


def _text_match(text: str) -> dict[str, Any]:
    # The only place user text goes: the query value of a multi_match (see the docstring).
    return {
        "multi_match": {
            "query": text,
            "fields": list(TEXT_FIELDS),
            "type": "cross_fields",
            "operator": "and",
            "zero_terms_query": "none",
        }
    }


def _filters(query: OrderSearchQuery) -> list[dict[str, Any]]:
    filters: list[dict[str, Any]] = []
    if query.status:
        filters.append({"terms": {"status": sorted(s.value for s in query.status)}})
    totals: dict[str, float] = {}
    if query.min_total is not None:
        totals["gte"] = float(query.min_total)
    if query.max_total is not None:
        totals["lte"] = float(query.max_total)
    if totals:
        filters.append({"range": {"total": totals}})
    created: dict[str, str] = {}
    if query.created_from is not None:
        created["gte"] = _lower(query.created_from).isoformat()
    if query.created_to is not None:
        operator, bound = _upper(query.created_to)
        created[operator] = bound.isoformat()
    if created:
        filters.append({"range": {"created_at": created}})
    return filters


def _sort(query: OrderSearchQuery) -> list[dict[str, Any]]:
    # order_id last: equal keys would otherwise come back in an unstable order across pages.
    direction = query.direction.value
    if query.sort is SortField.RELEVANCE:
        keys = [{"_score": {"order": direction}}, {"created_at": {"order": "desc"}}]
    else:
        keys = [{query.sort.value: {"order": direction}}]
    return [*keys, {"order_id": {"order": "asc"}}]


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _lower(bound: DateBound) -> datetime:
    """The first instant a ``created_from`` bound includes."""
    if isinstance(bound, datetime):
        return _utc(bound)
    return datetime.combine(bound, time.min, tzinfo=UTC)


def _upper(bound: DateBound) -> tuple[str, datetime]:
    """How a ``created_to`` bound limits: up to the instant, or before the next day."""
    if isinstance(bound, datetime):
        return "lte", _utc(bound)
    return "lt", datetime.combine(bound + timedelta(days=1), time.min, tzinfo=UTC)


def _empty_range(start: DateBound, end: DateBound) -> bool:
    operator, upper = _upper(end)
    lower = _lower(start)
    return upper <= lower if operator == "lt" else upper < lower


def _page(query: OrderSearchQuery, body: Mapping[str, Any]) -> OrderSearchPage:
    hits = body["hits"]
    scored = query.sort is SortField.RELEVANCE
    return OrderSearchPage(
        total=int(hits["total"]["value"]),
        page=query.page,
        size=query.size,
        hits=tuple(_hit(raw, scored) for raw in hits["hits"]),
    )


def _hit(raw: Mapping[str, Any], scored: bool) -> OrderSearchHit:
    source = raw["_source"]
    return OrderSearchHit(
        order_id=source["order_id"],
        customer_id=source["customer_id"],
        customer_name=source["customer_name"],
        city=source["shipping_city"],
        status=source["status"],
        # Stored as a double; money goes back to two decimals.
        total=Decimal(str(source["total"])).quantize(_CENT),
        item_count=source["item_count"],
        created_at=source["created_at"],
        updated_at=source["updated_at"],
        score=raw.get("_score") if scored else None,
    )
