"""Command endpoints: answers, and every error status a client can cause (never a 500)."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from engine import Settings
from tests.integration.api.conftest import api_client

ADDRESS = {"street": "1 Analytical Way", "city": "London", "postal_code": "N1", "country": "UK"}


async def _post(api: httpx.AsyncClient, path: str, body: Any, status: int = 201) -> Any:
    response = await api.post(path, json=body)
    assert response.status_code == status, response.text
    return response.json()


async def _customer_and_product(api: httpx.AsyncClient) -> tuple[str, str]:
    customer = await _post(
        api, "/customers", {"name": "Ada Lovelace", "email": f"{uuid.uuid4().hex}@example.com"}
    )
    product = await _post(api, "/products", {"name": "Difference Engine", "price": "19.99"})
    return customer["aggregate_id"], product["aggregate_id"]


async def _order(api: httpx.AsyncClient, quantity: int = 2) -> dict[str, Any]:
    customer, product = await _customer_and_product(api)
    body = {
        "customer_id": customer,
        "items": [{"product_id": product, "quantity": quantity}],
        "shipping_address": ADDRESS,
    }
    created: dict[str, Any] = await _post(api, "/orders", body)
    return created


async def test_an_order_goes_through_its_life_cycle(api: httpx.AsyncClient) -> None:
    created = await _order(api)
    order = created["aggregate_id"]
    assert created["version"] == 1
    assert created["event_types"] == ["OrderCreated"]
    assert created["duplicate"] is False
    partition, position = created["consistency_token"].split(".")
    assert int(position) > 0 and 0 <= int(partition) < 3

    response = await api.put(
        f"/orders/{order}/shipping-address", json={"shipping_address": {**ADDRESS, "city": "Paris"}}
    )
    assert response.status_code == 200, response.text
    assert response.json()["version"] == 2
    confirmed = await _post(api, f"/orders/{order}/confirm", None, 200)
    assert (confirmed["version"], confirmed["event_types"]) == (3, ["OrderConfirmed"])
    shipped = await _post(api, f"/orders/{order}/ship", {"tracking_number": "TRK-1"}, 200)
    assert shipped["version"] == 4
    delivered = await _post(api, f"/orders/{order}/deliver", {}, 200)
    assert delivered["version"] == 5
    assert int(delivered["consistency_token"].split(".")[1]) > int(position)


async def test_cancel_before_delivery(api: httpx.AsyncClient) -> None:
    order = (await _order(api))["aggregate_id"]
    cancelled = await _post(api, f"/orders/{order}/cancel", {"reason": "changed my mind"}, 200)
    assert cancelled["event_types"] == ["OrderCancelled"]


async def test_an_invalid_transition_is_409_naming_both_states(api: httpx.AsyncClient) -> None:
    order = (await _order(api))["aggregate_id"]
    response = await api.post(f"/orders/{order}/deliver")
    assert response.status_code == 409
    body = response.json()
    assert body["error"] == "rule_violation"
    assert body["details"] == {"current": "PENDING", "requested": "DELIVERED"}
    assert "PENDING" in body["message"] and "DELIVERED" in body["message"]


async def test_a_stale_expected_version_is_409_conflict(api: httpx.AsyncClient) -> None:
    order = (await _order(api))["aggregate_id"]
    await _post(api, f"/orders/{order}/confirm", {"expected_version": 1}, 200)
    response = await api.post(
        f"/orders/{order}/cancel", json={"reason": "x", "expected_version": 1}
    )
    assert response.status_code == 409
    assert response.json()["error"] in {"conflict", "rule_violation"}


async def test_unknown_ids_are_404(api: httpx.AsyncClient) -> None:
    missing = uuid.uuid4()
    response = await api.post(f"/orders/{missing}/confirm")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"
    _, product = await _customer_and_product(api)
    response = await api.post(
        "/orders",
        json={
            "customer_id": str(missing),
            "items": [{"product_id": product, "quantity": 1}],
            "shipping_address": ADDRESS,
        },
    )
    assert response.status_code == 404


async def test_the_same_command_id_is_answered_once(api: httpx.AsyncClient) -> None:
    body = {"command_id": str(uuid.uuid4()), "name": "Bob", "email": "bob@example.com"}
    first = await _post(api, "/customers", body)
    again = await _post(api, "/customers", body)
    assert again["duplicate"] is True
    assert again["aggregate_id"] == first["aggregate_id"]
    reused = await api.post("/customers", json={**body, "name": "Someone Else"})
    assert reused.status_code == 409
    assert reused.json()["error"] == "command_id_reused"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "", "email": "a@b.co"}, "body.name"),
        ({"name": "Ann", "email": "not-an-email"}, "body.email"),
        ({"name": "Ann", "email": "a@b.co", "admin": True}, "body.admin"),
        ({"name": 12, "email": "a@b.co"}, "body.name"),
        ({"email": "a@b.co"}, "body.name"),
        ([1, 2, 3], "body"),
    ],
)
async def test_invalid_input_is_422_naming_the_field(
    api: httpx.AsyncClient, body: Any, field: str
) -> None:
    response = await api.post("/customers", json=body)
    assert response.status_code == 422, response.text
    answer = response.json()
    assert answer["error"] == "validation_failed"
    assert answer["field"] == field


async def test_a_nested_field_is_named_with_its_path(api: httpx.AsyncClient) -> None:
    customer, product = await _customer_and_product(api)
    response = await api.post(
        "/orders",
        json={
            "customer_id": customer,
            "items": [{"product_id": product, "quantity": 0}],
            "shipping_address": ADDRESS,
        },
    )
    assert response.status_code == 422
    assert response.json()["field"] == "body.items.0.quantity"


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b'{"name": "Ann", "email": ', b"\xff\xfe\x00", b"null", b'"a string"'],
)
async def test_malformed_json_is_422(api: httpx.AsyncClient, raw: bytes) -> None:
    response = await api.post(
        "/customers", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "validation_failed"


async def test_a_huge_payload_is_413_before_parsing(
    api: httpx.AsyncClient, settings_for_test: Settings
) -> None:
    name = "x" * (settings_for_test.api.max_body_bytes + 1)
    response = await api.post("/customers", json={"name": name, "email": "a@b.co"})
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"

    async def chunks() -> Any:  # no Content-Length: counted while read
        for _ in range(settings_for_test.api.max_body_bytes // 1000 + 2):
            yield b"x" * 1000

    streamed = await api.post(
        "/customers", content=chunks(), headers={"content-type": "application/json"}
    )
    assert streamed.status_code == 413


async def test_a_malformed_path_id_is_422(api: httpx.AsyncClient) -> None:
    response = await api.post("/orders/not-a-uuid/confirm")
    assert response.status_code == 422
    assert response.json()["field"] == "path.order_id"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/orders", {"customer_id": "x" * 5000}),
        ("POST", "/orders", {"items": [{}] * 500}),
        ("POST", "/products", {"name": "P", "price": "1e400"}),
        ("POST", "/products", {"name": "P", "price": "NaN"}),
        ("POST", "/products", {"name": "P", "price": -1}),
        ("POST", "/products", {"name": "\u0000", "price": "1.00"}),
        ("POST", "/customers", {"name": "A" * 201, "email": "a@b.co"}),
        ("POST", f"/orders/{uuid.uuid4()}/ship", {"tracking_number": ""}),
        ("POST", f"/orders/{uuid.uuid4()}/cancel", {"reason": None}),
        ("PUT", f"/orders/{uuid.uuid4()}/shipping-address", {"shipping_address": "Paris"}),
        ("POST", f"/orders/{uuid.uuid4()}/confirm", {"expected_version": 0}),
        ("POST", f"/orders/{uuid.uuid4()}/confirm", {"expected_version": 10**30}),
        ("GET", "/orders?status=LOST", None),
        ("GET", "/customers/123/orders", None),
        ("GET", "/stats/orders?date_from=2026-13-01&date_to=2026-01-01", None),
        ("GET", "/search/orders?size=1000", None),
        ("GET", "/search/orders?min_total=-5", None),
        ("GET", f"/orders/{uuid.uuid4()}?consistency_token=999.5", None),
        ("GET", f"/orders/{uuid.uuid4()}?consistency_token=1.99999999999999999999", None),
        ("GET", "/search/orders?page=100000000000000000000", None),
        ("GET", "/customers/" + str(uuid.uuid4()) + "/orders?limit=0", None),
    ],
)
async def test_nothing_a_client_sends_is_a_500(
    api: httpx.AsyncClient, method: str, path: str, body: Any
) -> None:
    response = await api.request(method, path, json=body)
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert response.json()["error"]


async def test_api_keys_separate_writers_from_readers(
    settings_for_test: Settings, pool: Any, resources: Any
) -> None:
    api_settings = settings_for_test.api.model_copy(
        update={"writer_key": SecretStr("w-secret"), "reader_key": SecretStr("r-secret")}
    )
    settings = settings_for_test.model_copy(update={"api": api_settings})
    body = {"name": "Ann", "email": "ann@example.com"}
    async with api_client(settings) as api:
        assert (await api.post("/customers", json=body)).status_code == 401
        reader = {"X-API-Key": "r-secret"}
        assert (await api.post("/customers", json=body, headers=reader)).status_code == 401
        writer = {"X-API-Key": "w-secret"}
        created = await api.post("/customers", json=body, headers=writer)
        assert created.status_code == 201
        missing = f"/orders/{uuid.uuid4()}"
        assert (await api.get(missing)).status_code == 401
        assert (await api.get(missing, headers={"X-API-Key": "wrong"})).status_code == 401
        # Let in; no daemon ran, so the view does not exist yet: 503 not_ready, not a 500.
        for key in (reader, writer):
            answer = await api.get(missing, headers=key)
            assert (answer.status_code, answer.json()["error"]) == (503, "not_ready")
        assert (await api.get("/health")).status_code == 200
