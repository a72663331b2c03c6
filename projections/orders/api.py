"""The orders HTTP endpoints: commands through the bus, queries through the read side.

Built on the engine's public API (``engine.api``): the engine supplies the
context, the error mapping (422/404/409/503), body limits and API keys.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Annotated, Any, TypeVar
from uuid import UUID

import elasticsearch
from elasticsearch import AsyncElasticsearch
from fastapi import APIRouter, Body, Depends, Path, Query, status
from pydantic import BaseModel, ConfigDict, Field

from engine import (
    Command,
    ConsistencyToken,
    RedisHashReader,
    elasticsearch_address,
    elasticsearch_errors,
    validate_command,
)
from engine.api import (
    READER,
    WRITER,
    ApiContext,
    api_context,
    consistency_token,
    error_responses,
)
from projections.orders.commands import (
    TEXT_PATTERN,
    Address,
    CancelOrder,
    ChangeShippingAddress,
    ConfirmOrder,
    CreateOrder,
    DeliverOrder,
    RegisterCustomer,
    RegisterProduct,
    ShipOrder,
)
from projections.orders.queries import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    MAX_STATS_DAYS,
    OrderDetailsView,
    OrdersQueries,
    OrderStatsReport,
    OrderSummaryPage,
    QuickLookup,
)
from projections.orders.rules import OrderStatus
from projections.orders.search import (
    MAX_RESULT_WINDOW,
    OrderSearchPage,
    SortDirection,
    SortField,
    parse_search_query,
    search_orders,
)
from projections.orders.views import OrderSearch
from projections.orders.wiring import quick_lookup_prefix, search_alias

Context = Annotated[ApiContext, Depends(api_context)]
Token = Annotated[ConsistencyToken | None, Depends(consistency_token)]
OrderId = Annotated[UUID, Path(description="The order's id.")]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description=f"At most {MAX_PAGE_SIZE}.")]
Cursor = Annotated[
    str | None, Query(max_length=200, description="next_cursor of the previous page.")
]


class CommandAccepted(BaseModel):
    """What a command did. Pass ``consistency_token`` to a query to read this write."""

    command_id: UUID
    aggregate_id: str
    version: int
    consistency_token: str | None
    event_types: list[str]
    # True when this command id was seen before: nothing new was recorded.
    duplicate: bool


class _Body(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    command_id: UUID | None = Field(
        default=None, description="Idempotency key: a retry with the same id records nothing new."
    )
    expected_version: int | None = Field(
        default=None, ge=1, description="Refuse with 409 if the order moved past this version."
    )


class ConfirmBody(_Body):
    pass


class DeliverBody(_Body):
    pass


class ShipBody(_Body):
    tracking_number: str = Field(min_length=1, max_length=64, pattern=TEXT_PATTERN)
    carrier: str = Field(default="unspecified", min_length=1, max_length=64, pattern=TEXT_PATTERN)


class CancelBody(_Body):
    reason: str = Field(min_length=1, max_length=500, pattern=TEXT_PATTERN)


class AddressBody(_Body):
    shipping_address: Address


async def _execute(ctx: ApiContext, command: Command) -> CommandAccepted:
    result = await ctx.bus.execute(command)
    return CommandAccepted(
        command_id=result.command_id,
        aggregate_id=result.aggregate_id,
        version=result.version,
        consistency_token=ctx.token_for(result),
        event_types=result.event_types,
        duplicate=result.duplicate,
    )


C = TypeVar("C", bound=Command)


def _order_command(kind: type[C], order_id: UUID, body: _Body) -> C:
    fields = body.model_dump(exclude_none=True)
    return validate_command(kind, {**fields, "order_id": order_id})


def _queries(ctx: ApiContext) -> OrdersQueries:
    return ctx.memo(_build_queries)


def _build_queries(ctx: ApiContext) -> OrdersQueries:
    reads = ctx.reads
    return OrdersQueries(
        pool=reads.pool,
        quick=RedisHashReader(reads.redis, quick_lookup_prefix(reads)),
        gate=ctx.gate,
    )


async def _refresh(es: AsyncElasticsearch, alias: str) -> None:
    try:
        with elasticsearch_errors(elasticsearch_address(es)):
            await es.indices.refresh(index=alias)
    except elasticsearch.NotFoundError:
        return  # no index yet: the search itself says so


# Links (OpenAPI 3.1): what a client does next with what a command returned.
_ID = "$response.body#/aggregate_id"
_TOKEN = "$response.body#/consistency_token"


def _order_links(*commands: str) -> dict[str, Any]:
    """From an answer about an order to its reads (with the token) and its next commands."""
    order = {"path.order_id": _ID}
    links: dict[str, Any] = {
        name: {"operationId": name, "parameters": {**order, "query.consistency_token": _TOKEN}}
        for name in ("order_details", "quick_lookup")
    }
    links.update({name: {"operationId": name, "parameters": order} for name in commands})
    return links


_AFTER_CREATE = _order_links("confirm_order", "cancel_order", "change_address")
_AFTER_CONFIRM = _order_links("ship_order", "cancel_order", "change_address")
_AFTER_SHIP = _order_links("deliver_order", "cancel_order")
_AFTER_OTHER = _order_links()
_AFTER_CUSTOMER = {
    "customer_orders": {
        "operationId": "customer_orders",
        "parameters": {"path.customer_id": _ID, "query.consistency_token": _TOKEN},
    },
    "create_order": {"operationId": "create_order", "requestBody": {"customer_id": _ID}},
}
_AFTER_PRODUCT = {
    "create_order": {
        "operationId": "create_order",
        "requestBody": {"items": [{"product_id": _ID, "quantity": 1}]},
    },
}


def _next_page(operation: str, *parameters: str) -> dict[str, Any]:
    """From a page to the next one: the same query, with the page's ``next_cursor``."""
    same = {name: f"$request.{name}" for name in parameters}
    return {
        "next_page": {
            "operationId": operation,
            "parameters": {**same, "query.cursor": "$response.body#/next_cursor"},
        }
    }


def _answers(code: int, links: dict[str, Any], *errors: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"links": links}, **error_responses(*errors)}


def build_router() -> APIRouter:
    """All orders endpoints (``Application.api``)."""
    commands = APIRouter(tags=["commands"], dependencies=[WRITER])
    _command_routes(commands)
    queries = APIRouter(tags=["queries"], dependencies=[READER])
    _query_routes(queries)
    # One flat router: each route already carries its tag and key dependency (an
    # APIRouter applies its own when a route is added). Nested includes would match
    # every request against each level's routes again (FastAPI's included routers
    # are matched lazily, per request); the queries come first, being the most asked.
    router = APIRouter()
    router.routes.extend([*queries.routes, *commands.routes])
    return router


def _command_routes(router: APIRouter) -> None:
    created = status.HTTP_201_CREATED
    # 409: a rule (e.g. the email is taken, the transition is not allowed), a
    # concurrent change, or a command id reused with other content.
    # 404: an order command's order, or a new order's customer or product.

    @router.post(
        "/customers",
        summary="Register a customer",
        status_code=created,
        responses=_answers(created, _AFTER_CUSTOMER, 409, 503),
    )
    async def register_customer(ctx: Context, command: RegisterCustomer) -> CommandAccepted:
        return await _execute(ctx, command)

    @router.post(
        "/products",
        summary="Register a product (the price list)",
        status_code=created,
        responses=_answers(created, _AFTER_PRODUCT, 409, 503),
    )
    async def register_product(ctx: Context, command: RegisterProduct) -> CommandAccepted:
        return await _execute(ctx, command)

    @router.post(
        "/orders",
        summary="Create an order (PENDING)",
        status_code=created,
        responses=_answers(created, _AFTER_CREATE, 404, 409, 503),
    )
    async def create_order(ctx: Context, command: CreateOrder) -> CommandAccepted:
        return await _execute(ctx, command)

    @router.post(
        "/orders/{order_id}/confirm", responses=_answers(200, _AFTER_CONFIRM, 404, 409, 503)
    )
    async def confirm_order(
        ctx: Context, order_id: OrderId, body: Annotated[ConfirmBody | None, Body()] = None
    ) -> CommandAccepted:
        """PENDING -> CONFIRMED."""
        return await _execute(ctx, _order_command(ConfirmOrder, order_id, body or ConfirmBody()))

    @router.post("/orders/{order_id}/ship", responses=_answers(200, _AFTER_SHIP, 404, 409, 503))
    async def ship_order(ctx: Context, order_id: OrderId, body: ShipBody) -> CommandAccepted:
        """CONFIRMED -> SHIPPED, with the tracking number."""
        return await _execute(ctx, _order_command(ShipOrder, order_id, body))

    @router.post("/orders/{order_id}/deliver", responses=_answers(200, _AFTER_OTHER, 404, 409, 503))
    async def deliver_order(
        ctx: Context, order_id: OrderId, body: Annotated[DeliverBody | None, Body()] = None
    ) -> CommandAccepted:
        """SHIPPED -> DELIVERED."""
        return await _execute(ctx, _order_command(DeliverOrder, order_id, body or DeliverBody()))

    @router.post("/orders/{order_id}/cancel", responses=_answers(200, _AFTER_OTHER, 404, 409, 503))
    async def cancel_order(ctx: Context, order_id: OrderId, body: CancelBody) -> CommandAccepted:
        """Cancel an order that is not delivered yet."""
        return await _execute(ctx, _order_command(CancelOrder, order_id, body))

    @router.put(
        "/orders/{order_id}/shipping-address",
        responses=_answers(200, _AFTER_OTHER, 404, 409, 503),
    )
    async def change_address(ctx: Context, order_id: OrderId, body: AddressBody) -> CommandAccepted:
        """Change where an order goes, until it ships."""
        return await _execute(ctx, _order_command(ChangeShippingAddress, order_id, body))


# A non-negative amount with at most 2 decimals, as the search's totals are bounded.
AMOUNT_PATTERN = r"^(?:0|[1-9][0-9]{0,11})(?:\.[0-9]{1,2})?$"
Amount = Annotated[
    str | None,
    Query(
        pattern=AMOUNT_PATTERN,
        description="An amount such as 19.99: at most 12 integer digits and 2 decimals.",
    ),
]


def _amount(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


def _query_routes(router: APIRouter) -> None:
    # 503: a store is down, or the consistency token's write is not read in time.
    found = error_responses(404, 503)
    read = error_responses(503)

    @router.get("/orders/{order_id}", responses=found)
    async def order_details(ctx: Context, order_id: OrderId, token: Token) -> OrderDetailsView:
        """Everything about one order (PostgreSQL view ``order_details``)."""
        return await _queries(ctx).order_details(str(order_id), token)

    @router.get("/orders/{order_id}/quick", responses=found)
    async def quick_lookup(ctx: Context, order_id: OrderId, token: Token) -> QuickLookup:
        """Status and total by key from Redis; from PostgreSQL if the key is missing."""
        return await _queries(ctx).quick_lookup(str(order_id), token)

    @router.get(
        "/customers/{customer_id}/orders",
        responses={
            200: {"links": _next_page("customer_orders", "path.customer_id")},
            **read,
        },
    )
    async def customer_orders(
        ctx: Context,
        customer_id: Annotated[UUID, Path()],
        token: Token,
        cursor: Cursor = None,
        limit: Limit = DEFAULT_PAGE_SIZE,
    ) -> OrderSummaryPage:
        """A customer's orders, newest first, a page at a time.

        ``cursor`` must be a ``next_cursor`` this API returned (else 422).
        """
        return await _queries(ctx).customer_orders(
            str(customer_id), cursor=cursor, limit=limit, token=token
        )

    @router.get(
        "/orders",
        responses={200: {"links": _next_page("orders_by_status", "query.status")}, **read},
    )
    async def orders_by_status(
        ctx: Context,
        status: OrderStatus,
        token: Token,
        cursor: Cursor = None,
        limit: Limit = DEFAULT_PAGE_SIZE,
    ) -> OrderSummaryPage:
        """Orders currently in a status, newest first.

        ``cursor`` must be a ``next_cursor`` this API returned (else 422).
        """
        return await _queries(ctx).orders_by_status(status, cursor=cursor, limit=limit, token=token)

    @router.get(
        "/stats/orders",
        responses=read,
        description="Orders and revenue per day placed and status, with totals (inclusive "
        "range). ``date_to`` must be on or after ``date_from``, by at most "
        f"{MAX_STATS_DAYS} days (else 422).",
    )
    async def order_stats(
        ctx: Context, date_from: date, date_to: date, token: Token
    ) -> OrderStatsReport:
        """Orders and revenue per day placed and status, with totals (inclusive range)."""
        return await _queries(ctx).order_stats(date_from, date_to, token)

    @router.get("/search/orders", responses=read)
    async def search(  # noqa: PLR0917 - one parameter per search filter
        ctx: Context,
        token: Token,
        text: Annotated[str | None, Query(max_length=200)] = None,
        status: Annotated[list[OrderStatus] | None, Query()] = None,
        min_total: Amount = None,
        max_total: Amount = None,
        created_from: Annotated[date | None, Query()] = None,
        created_to: Annotated[date | None, Query()] = None,
        sort: SortField = SortField.RELEVANCE,
        direction: SortDirection = SortDirection.DESC,
        page: Annotated[int, Query(ge=1, le=MAX_RESULT_WINDOW)] = 1,
        size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
    ) -> OrderSearchPage:
        """Free text over customer name, product names and city; filters, sorting, paging.

        The text is matched as words (never parsed as query syntax). Between
        parameters (else 422): ``max_total`` not below ``min_total``,
        ``created_to`` not before ``created_from``, and ``page * size`` at most
        10000 (the deepest result Elasticsearch serves).
        """
        query = parse_search_query(
            {
                "text": text,
                "status": status or [],
                "min_total": _amount(min_total),
                "max_total": _amount(max_total),
                "created_from": created_from,
                "created_to": created_to,
                "sort": sort,
                "direction": direction,
                "page": page,
                "size": size,
            }
        )
        reads = ctx.reads
        alias = search_alias(reads)
        if token is not None:
            await ctx.gate.wait([OrderSearch.name], token)
            # Applied is not yet searchable: make the index's latest writes visible.
            await _refresh(reads.elasticsearch, alias)
        return await search_orders(reads.elasticsearch, alias, query)
