"""The OpenAPI document: every status declared, keys only when configured, patterns exact.

No services: the document is built from the routes and the settings alone.
The patterns are checked with jsonschema-rs (how a client reads the document)
against what the server's own code accepts.
"""

from __future__ import annotations

import re
from typing import Any

import jsonschema_rs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from engine import ConsistencyToken, Settings, ValidationFailedError
from engine.api import create_app
from engine.api.openapi import MAX_POSITION, NO_NUL, allowed_methods, token_pattern
from projections.orders import APP
from projections.orders.commands import PRICE_PATTERN, TEXT_PATTERN, RegisterProduct

COMMANDS = {
    "register_customer": {"201", "409", "413", "422", "503"},
    "register_product": {"201", "409", "413", "422", "503"},
    "create_order": {"201", "404", "409", "413", "422", "503"},
    "confirm_order": {"200", "404", "409", "413", "422", "503"},
    "ship_order": {"200", "404", "409", "413", "422", "503"},
    "deliver_order": {"200", "404", "409", "413", "422", "503"},
    "cancel_order": {"200", "404", "409", "413", "422", "503"},
    "change_address": {"200", "404", "409", "413", "422", "503"},
}
QUERIES = {
    "order_details": {"200", "404", "422", "503"},
    "quick_lookup": {"200", "404", "422", "503"},
    "customer_orders": {"200", "422", "503"},
    "orders_by_status": {"200", "422", "503"},
    "order_stats": {"200", "422", "503"},
    "search": {"200", "422", "503"},
    "status": {"200", "503"},
}
OPEN = {"health": {"200"}, "health_live": {"200"}, "health_ready": {"200", "503"}}
# Answers whose body is not an ApiError: the readiness verdict, 503 included.
VERDICTS = {("health_ready", "200"), ("health_ready", "503")}


def _document(**api: Any) -> dict[str, Any]:
    settings = Settings()
    settings = settings.model_copy(update={"api": settings.api.model_copy(update=api)})
    return create_app(settings, APP).openapi()


def _operations(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        operation["operationId"]: operation
        for item in document["paths"].values()
        for operation in item.values()
    }


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return _document()


def test_every_operation_declares_exactly_the_statuses_it_can_answer(
    document: dict[str, Any],
) -> None:
    declared = {name: set(op["responses"]) for name, op in _operations(document).items()}
    assert declared == {**COMMANDS, **QUERIES, **OPEN}


def test_every_error_answer_is_an_api_error(document: dict[str, Any]) -> None:
    for name, operation in _operations(document).items():
        for code, response in operation["responses"].items():
            if int(code) >= 400 and (name, code) not in VERDICTS:
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ApiError"}, (name, code)
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    assert set(schemas["ApiError"]["required"]) == {"error", "message"}


def test_not_ready_answers_the_verdict_naming_what_is_stalled(document: dict[str, Any]) -> None:
    responses = _operations(document)["health_ready"]["responses"]
    for code in ("200", "503"):
        schema = responses[code]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ReadinessBody"}, code
    body = document["components"]["schemas"]["ReadinessBody"]
    assert set(body["required"]) == {"status", "problems", "sample_age_s"}


def test_without_keys_nothing_asks_for_one(document: dict[str, Any]) -> None:
    assert "securitySchemes" not in document["components"]
    for operation in _operations(document).values():
        assert "security" not in operation
        assert "401" not in operation["responses"]


@pytest.mark.parametrize(
    ("keys", "guarded"),
    [
        ({"writer_key": SecretStr("w")}, {name: "WriterKey" for name in COMMANDS}),
        ({"reader_key": SecretStr("r")}, {name: "ReaderKey" for name in QUERIES}),
        (
            {"writer_key": SecretStr("w"), "reader_key": SecretStr("r")},
            {**{n: "WriterKey" for n in COMMANDS}, **{n: "ReaderKey" for n in QUERIES}},
        ),
    ],
)
def test_a_configured_key_is_declared_where_it_is_checked(
    keys: dict[str, SecretStr], guarded: dict[str, str]
) -> None:
    document = _document(**keys)
    schemes = document["components"]["securitySchemes"]
    assert set(schemes) == set(guarded.values())
    for scheme in schemes.values():
        assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "header", "X-API-Key")
    for name, operation in _operations(document).items():
        if name in guarded:
            assert operation["security"] == [{guarded[name]: []}], name
            assert "401" in operation["responses"], name
        else:
            assert "security" not in operation, name
            assert "401" not in operation["responses"], name


def _token_schemas(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        parameter["schema"]
        for operation in _operations(document).values()
        for parameter in operation.get("parameters", [])
        if parameter["name"] in ("consistency_token", "x-consistency-token")
    ]


def test_every_token_parameter_carries_the_pattern(document: dict[str, Any]) -> None:
    schemas = _token_schemas(document)
    assert len(schemas) == 2 * 6  # query and header, on each of the six reads
    partitions = Settings().kafka.partitions
    assert all(s == {"type": "string", "pattern": token_pattern(partitions)} for s in schemas)


@given(st.data(), st.integers(1, 5000))
def test_the_pattern_accepts_every_token_the_api_issues(data: st.DataObject, n: int) -> None:
    partition = data.draw(st.integers(0, n - 1))
    position = data.draw(st.integers(0, MAX_POSITION) | st.sampled_from([0, MAX_POSITION]))
    text = ConsistencyToken(partition, position).encode()
    validator = jsonschema_rs.validator_for({"type": "string", "pattern": token_pattern(n)})
    assert validator.is_valid(text)
    assert re.fullmatch(token_pattern(n), text)
    assert ConsistencyToken.parse(text) == ConsistencyToken(partition, position)


@given(st.integers(1, 5000), st.text(max_size=30))
def test_the_pattern_refuses_what_parse_refuses(n: int, text: str) -> None:
    validator = jsonschema_rs.validator_for({"type": "string", "pattern": token_pattern(n)})
    try:
        ConsistencyToken.parse(text)
    except ValidationFailedError:
        assert not validator.is_valid(text)


@pytest.mark.parametrize(
    "text",
    ["6.1", "10.1", "01.5", "1.05 ", " 1.5", "1.5\n", "1.", ".1", "1.-5", f"1.{MAX_POSITION + 1}"],
)
def test_the_pattern_refuses_tokens_the_api_cannot_have_issued(text: str) -> None:
    validator = jsonschema_rs.validator_for({"type": "string", "pattern": token_pattern(6)})
    assert not validator.is_valid(text)
    assert re.fullmatch(token_pattern(6), text) is None


def _body_strings(document: dict[str, Any]) -> list[dict[str, Any]]:
    schemas = document["components"]["schemas"]
    found: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "string" and "format" not in node and "enum" not in node:
                found.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for name in ("RegisterCustomer", "RegisterProduct", "CreateOrder", "ShipBody", "CancelBody"):
        walk(schemas[name])
    walk(schemas["Address"])
    return found


def test_no_string_of_a_request_body_admits_nul(document: dict[str, Any]) -> None:
    strings = _body_strings(document)
    assert len(strings) > 10
    for schema in strings:
        validator = jsonschema_rs.validator_for(schema)
        assert "pattern" in schema, schema
        assert not validator.is_valid("a\x00b"), schema
    assert re.fullmatch(NO_NUL, "abc") and not re.fullmatch(NO_NUL, "a\x00")


@given(st.text(max_size=12))
def test_text_the_schema_allows_is_text_the_server_keeps(text: str) -> None:
    # The server strips, then needs something left; the pattern says it without stripping.
    allowed = jsonschema_rs.validator_for({"type": "string", "pattern": TEXT_PATTERN})
    try:
        RegisterProduct.model_validate({"name": text, "price": "1.00"})
        accepted = True
    except ValidationError:
        accepted = False
    assert accepted == (allowed.is_valid(text) and len(text) >= 1)


PRICES = (
    st.from_regex(PRICE_PATTERN, fullmatch=True)
    | st.text("0123456789.-+eE ", max_size=14)
    | st.integers(-5, 10**11)
    | st.floats(allow_nan=True)
    | st.decimals(places=3, allow_nan=False, allow_infinity=False).map(str)
)


@given(PRICES)
def test_a_price_is_accepted_exactly_when_the_schema_allows_it(price: object) -> None:
    schema = RegisterProduct.model_json_schema()["properties"]["price"]
    allowed = jsonschema_rs.validator_for(schema).is_valid(price)
    try:
        RegisterProduct.model_validate({"name": "Slide rule", "price": price})
        accepted = True
    except ValidationError:
        accepted = False
    assert accepted == allowed, (price, schema)


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/orders", ["GET", "POST"]),
        ("/orders/0e4c61b0-8a3e-4a40-9a8a-2b8f1c1a3e10", ["GET"]),
        ("/orders/x/confirm", ["POST"]),
        ("/orders/x/shipping-address", ["PUT"]),
        ("/nowhere", []),
    ],
)
def test_allow_names_every_method_the_document_lists_for_a_path(
    document: dict[str, Any], path: str, allowed: list[str]
) -> None:
    assert allowed_methods(document, path) == allowed
