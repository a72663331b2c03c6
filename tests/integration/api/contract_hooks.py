"""Schemathesis hooks for the contract test, loaded through SCHEMATHESIS_HOOKS.

JSON Schema constrains each parameter alone; a rule between two parameters
(a range's end not before its start) is written in the operation's
description and answered with 422. Schemathesis cannot read a description, so
a generated query that breaks such a rule is dropped here: it would be a
malformed request that the schema, by its nature, cannot call malformed.
"""

from __future__ import annotations

import os
import uuid
from datetime import date
from decimal import Decimal, InvalidOperation
from typing import Any

import schemathesis

from engine import ValidationFailedError
from engine.api.openapi import token_regex
from projections.orders.queries import MAX_STATS_DAYS, decode_cursor
from projections.orders.search import MAX_RESULT_WINDOW

DEFAULT_SIZE = 20
_TOKEN_NAMES = ("consistency_token", "x-consistency-token")
MAX_EMAIL = 254
PARTITIONS = int(os.environ.get("ENGINE_KAFKA__PARTITIONS", "3"))
# A product the test registered before the run (a new order needs one that exists).
PRODUCT = os.environ.get("CONTRACT_PRODUCT_ID")


def _date(value: Any) -> date | None:
    try:
        return date.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _decimal(value: Any) -> Decimal | None:
    try:
        return Decimal(value) if isinstance(value, str) else None
    except InvalidOperation:
        return None


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _stats_range_holds(query: dict[str, Any]) -> bool:
    start, end = _date(query.get("date_from")), _date(query.get("date_to"))
    if start is None or end is None:
        return True
    return start <= end and (end - start).days <= MAX_STATS_DAYS


def _search_rules_hold(query: dict[str, Any]) -> bool:
    low, high = _decimal(query.get("min_total")), _decimal(query.get("max_total"))
    if low is not None and high is not None and high < low:
        return False
    start, end = _date(query.get("created_from")), _date(query.get("created_to"))
    if start is not None and end is not None and end < start:
        return False
    page, size = _int(query.get("page", 1)), _int(query.get("size", DEFAULT_SIZE))
    return page is None or size is None or page * size <= MAX_RESULT_WINDOW


def _cursor_is_ours(query: dict[str, Any]) -> bool:
    cursor = query.get("cursor")
    if not isinstance(cursor, str):
        return True
    try:
        decode_cursor(cursor)
    except ValidationFailedError:
        return False
    return True


@schemathesis.hook
def filter_query(ctx: schemathesis.HookContext, query: dict[str, Any] | None) -> bool:
    if not query or ctx.operation is None:
        return True
    if ctx.operation.path == "/stats/orders":
        return _stats_range_holds(query)
    if ctx.operation.path == "/search/orders":
        return _search_rules_hold(query)
    # An opaque cursor is valid only if this API issued it (the description says so).
    return _cursor_is_ours(query)


@schemathesis.hook
def map_case(ctx: schemathesis.HookContext, case: schemathesis.Case) -> schemathesis.Case:
    """A valid new customer gets an email of its own, so it is registered (201), not refused.

    Generated emails repeat ("0@0.0"), and a taken email is a 409 that ends
    the stateful scenario before the links to orders are followed. Only valid
    cases: prefixing could make an invalid email valid.
    """
    operation, meta = case.operation, case.meta
    if (operation.method, operation.path) != ("post", "/customers") or meta is None:
        return case
    body = case.body
    if meta.generation.mode.is_positive and isinstance(body, dict):
        email = body.get("email")
        if isinstance(email, str) and len(email) + 32 <= MAX_EMAIL:
            body["email"] = uuid.uuid4().hex + email.lstrip()
    return case


@schemathesis.hook
def filter_case(ctx: schemathesis.HookContext, case: schemathesis.Case) -> bool:
    """Drop a case generated as valid whose consistency token breaks the declared pattern.

    Seen with schemathesis 4.32: a header ``x-consistency-token: 0`` in a
    positive case, which the schema's own pattern refuses (so does jsonschema-rs).
    A valid-by-construction case that is not valid tests the generator, not us.
    """
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return True
    values = [
        *((case.query or {}).get(name) for name in _TOKEN_NAMES),
        *((case.headers or {}).get(name) for name in _TOKEN_NAMES),
    ]
    pattern = token_regex(PARTITIONS)
    return all(
        value is None or (isinstance(value, str) and pattern.fullmatch(value)) for value in values
    )


@schemathesis.hook
def map_body(ctx: schemathesis.HookContext, body: Any) -> Any:
    """A new order's items name the registered product, so orders get created.

    Its customer comes from the stateful phase's link from a registered customer
    (or is random, and the order is refused with 404, as declared).
    """
    operation = ctx.operation
    if (
        PRODUCT is None
        or operation is None
        or (operation.method, operation.path)
        != (
            "post",
            "/orders",
        )
    ):
        return body
    if isinstance(body, dict) and isinstance(body.get("items"), list):
        for item in body["items"]:
            if isinstance(item, dict) and "product_id" in item:
                item["product_id"] = PRODUCT
    return body


def _sent_token(case: schemathesis.Case) -> bool:
    query, headers = case.query or {}, case.headers or {}
    return any(query.get(name) for name in _TOKEN_NAMES) or any(
        headers.get(name) for name in _TOKEN_NAMES
    )


@schemathesis.check
def only_waiting_is_unavailable(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """A 503 (let through by ``not_a_server_error``'s configuration) only for a token's wait.

    A generated token names a write that never happened: the read waits for it,
    bounded, and answers 503 ``not_yet_consistent`` as the document declares.
    Any other 503 here (a store down, a schema missing) is a failure.
    """
    if response.status_code != 503:
        return None
    body = response.json()
    assert isinstance(body, dict), body
    assert body.get("error") == "not_yet_consistent" and _sent_token(case), (
        f"503 without a consistency token to wait for: {body}"
    )
    return True
