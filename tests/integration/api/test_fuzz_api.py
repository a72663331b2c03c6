"""Whatever JSON a client sends to a command endpoint, the answer is never a 500."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = st.sampled_from(
    [
        "name",
        "email",
        "price",
        "customer_id",
        "items",
        "shipping_address",
        "reason",
        "tracking_number",
        "carrier",
        "expected_version",
        "command_id",
        "product_id",
        "quantity",
    ]
)
BODIES = JSON | st.dictionaries(FIELDS, JSON, max_size=6)
ORDER = str(uuid.UUID(int=1))
ENDPOINTS = st.sampled_from(
    [
        ("POST", "/customers"),
        ("POST", "/products"),
        ("POST", "/orders"),
        ("POST", f"/orders/{ORDER}/confirm"),
        ("POST", f"/orders/{ORDER}/ship"),
        ("POST", f"/orders/{ORDER}/cancel"),
        ("PUT", f"/orders/{ORDER}/shipping-address"),
    ]
)


async def test_random_json_bodies_never_cause_a_server_error(api: httpx.AsyncClient) -> None:
    failures: list[tuple[str, str, Any, int, str]] = []
    cases: list[tuple[str, str, Any]] = []

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(endpoint=ENDPOINTS, body=BODIES)
    def examples(endpoint: tuple[str, str], body: Any) -> None:
        cases.append((*endpoint, body))

    examples()  # collect the examples, then send them on this test's event loop
    for method, path, body in cases:
        response = await api.request(method, path, json=body)
        if response.status_code >= 500:
            failures.append((method, path, body, response.status_code, response.text))
    assert not failures, failures[:3]
    assert len(cases) >= 100
