"""The order search's Elasticsearch failures, as the engine's seam and the search name them.

The client is real but never connects: the fault is injected into the one call
made (no service is involved).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from elastic_transport import ApiResponseMeta, HttpHeaders, NodeConfig
from elasticsearch import ApiError, AsyncElasticsearch, ConnectionError, ConnectionTimeout
from elasticsearch import NotFoundError as IndexNotFound

from engine import EngineError, ServiceUnavailableError, TransientError
from projections.orders.api import _refresh
from projections.orders.search import OrderSearchQuery, search_orders

CLUSTER = "es.example:9201"
ALIAS = "orders_search"


def _api_error(status: int, kind: type[ApiError] = ApiError) -> ApiError:
    meta = ApiResponseMeta(
        status=status,
        http_version="1.1",
        headers=HttpHeaders(),
        duration=0.0,
        node=NodeConfig("http", "es.example", 9201),
    )
    return kind(f"answered {status}", meta=meta, body={})


@pytest.fixture
async def es() -> AsyncIterator[AsyncElasticsearch]:
    client = AsyncElasticsearch(f"http://{CLUSTER}")
    yield client
    await client.close()


def _failing(monkeypatch: pytest.MonkeyPatch, target: object, name: str, exc: Exception) -> None:
    async def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise exc

    monkeypatch.setattr(target, name, fail)


async def _search(es: AsyncElasticsearch) -> None:
    await search_orders(es, ALIAS, OrderSearchQuery(text="Ada"))


@pytest.mark.parametrize("exc", [ConnectionError("refused"), ConnectionTimeout("timed out")])
async def test_a_search_against_an_unreachable_cluster_names_its_host_and_port(
    es: AsyncElasticsearch, monkeypatch: pytest.MonkeyPatch, exc: Exception
) -> None:
    _failing(monkeypatch, es, "search", exc)
    with pytest.raises(ServiceUnavailableError) as caught:
        await _search(es)
    assert (caught.value.service, caught.value.address) == ("Elasticsearch", CLUSTER)
    assert caught.value.__cause__ is exc


@pytest.mark.parametrize("status", [429, 503])
async def test_a_search_refused_for_a_while_is_transient(
    es: AsyncElasticsearch, monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    _failing(monkeypatch, es, "search", _api_error(status))
    with pytest.raises(TransientError) as caught:
        await _search(es)
    assert not isinstance(caught.value, ServiceUnavailableError)  # it answered
    assert f"Elasticsearch at {CLUSTER}" in str(caught.value)


async def test_a_search_the_index_rejects_is_not_worth_retrying(
    es: AsyncElasticsearch, monkeypatch: pytest.MonkeyPatch
) -> None:
    rejected = _api_error(400)
    _failing(monkeypatch, es, "search", rejected)
    with pytest.raises(EngineError) as caught:
        await _search(es)
    assert not isinstance(caught.value, TransientError)
    assert "rejected an order search" in str(caught.value)
    assert caught.value.__cause__ is rejected


async def test_a_search_of_a_missing_index_says_how_to_create_it(
    es: AsyncElasticsearch, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing(monkeypatch, es, "search", _api_error(404, IndexNotFound))
    with pytest.raises(ServiceUnavailableError) as caught:
        await _search(es)
    assert caught.value.address == ALIAS
    assert "engine run" in str(caught.value)


async def test_a_refresh_against_an_unreachable_cluster_names_its_host_and_port(
    es: AsyncElasticsearch, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It used to give the alias as the address.
    _failing(monkeypatch, es.indices, "refresh", ConnectionTimeout("timed out"))
    with pytest.raises(ServiceUnavailableError) as caught:
        await _refresh(es, ALIAS)
    assert (caught.value.service, caught.value.address) == ("Elasticsearch", CLUSTER)


async def test_a_refresh_refused_for_a_while_is_transient(
    es: AsyncElasticsearch, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing(monkeypatch, es.indices, "refresh", _api_error(503))
    with pytest.raises(TransientError) as caught:
        await _refresh(es, ALIAS)
    assert f"Elasticsearch at {CLUSTER}" in str(caught.value)


async def test_a_refresh_of_a_missing_index_is_left_to_the_search(
    es: AsyncElasticsearch, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing(monkeypatch, es.indices, "refresh", _api_error(404, IndexNotFound))
    await _refresh(es, ALIAS)  # no error: the search that follows names it
