"""The document cache of the compare-and-set stores, against the real Redis and Elasticsearch.

The cache (:mod:`engine.stores.cache`) lets a store fold a batch onto the
documents it wrote last instead of reading them back. What threatens it is a
document that changed behind the cache's back: another daemon writing the same
aggregate during a rebalance, ``engine dlq replay``, a write whose answer was
lost. The interleavings here play exactly that with two store instances (two
processes' caches) on the same keys, and a projection that records every
version it folded, so an event lost by folding from a stale base shows.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from engine import (
    Document,
    DocumentProjection,
    ElasticsearchDocumentStore,
    Projected,
    RedisHashStore,
    Resources,
)
from engine.testing import given
from tests.unit.test_testing_kit import confirmed, created, shipped


class Trail(DocumentProjection):
    """Every version folded, in order: "1,2,3". A lost event leaves a hole in it."""

    name = "trail"
    handles = frozenset({"OrderCreated", "OrderConfirmed", "OrderShipped"})
    MAPPINGS: ClassVar[dict[str, Any]] = {
        "dynamic": "strict",
        "properties": {"seen": {"type": "keyword"}, "first": {"type": "keyword"}},
    }

    def apply(self, doc: Document | None, item: Projected) -> Document:
        seen = f"{doc['seen']},{item.version}" if doc else str(item.version)
        # "first" exists only at version 1: the store must delete it afterwards.
        return {"seen": seen, **({"first": "yes"} if item.version == 1 else {})}


def _stores(resources: Resources, kind: str) -> tuple[Any, Any]:
    projection = Trail()
    if kind == "redis":
        prefix = f"{resources.settings.redis.key_prefix}trail:"
        return (
            RedisHashStore(resources.redis, projection, prefix),
            RedisHashStore(resources.redis, projection, prefix),
        )
    alias = f"{resources.settings.elasticsearch.index_prefix}-trail"
    return (
        ElasticsearchDocumentStore(resources.elasticsearch, projection, alias, Trail.MAPPINGS),
        ElasticsearchDocumentStore(resources.elasticsearch, projection, alias, Trail.MAPPINGS),
    )


async def _stored(resources: Resources, store: Any, kind: str) -> tuple[dict[str, Any], int]:
    if kind == "redis":
        fields = await resources.redis.hgetall(f"{store.key_prefix}o1")
        return {k: v for k, v in fields.items() if k != "_v"}, int(fields["_v"])
    found = await resources.elasticsearch.get(index=store.index, id="o1")
    source = dict(found["_source"])
    return {k: v for k, v in source.items() if k != "_v"}, int(source["_v"])


@pytest.fixture
def items() -> list[Projected]:
    return given(created("o1"), confirmed("o1"), shipped("o1"), aggregate_id="o1").items


@pytest.mark.parametrize("kind", ["redis", "elasticsearch"])
async def test_a_document_changed_behind_the_cache_is_read_again_not_written_over(
    resources: Resources, kind: str, items: list[Projected]
) -> None:
    ours, theirs = _stores(resources, kind)
    await ours.setup()
    assert await ours.apply(items[:1]) == 1  # ours caches version 1
    assert await theirs.apply(items[1:2]) == 1  # another daemon writes version 2

    # Ours folds version 3 onto its cached version 1 first: the write conflicts,
    # so it reads version 2 and folds again. Trusting the cache would give "1,3".
    assert await ours.apply(items[2:3]) == 1

    assert await _stored(resources, ours, kind) == ({"seen": "1,2,3"}, 3)
    assert ours.cache.hits >= 1  # the cache was used, not bypassed


@pytest.mark.parametrize("kind", ["redis", "elasticsearch"])
async def test_a_redelivered_first_event_is_not_written_as_new(
    resources: Resources, kind: str, items: list[Projected]
) -> None:
    ours, fresh = _stores(resources, kind)
    await ours.setup()
    assert await ours.apply(items) == 1

    # A process that knows nothing (a restart) gets version 1 again: it assumes
    # a new document, the store says it exists, it reads it and folds nothing.
    assert await fresh.apply(items[:1]) == 0
    assert await fresh.apply(items) == 0

    assert await _stored(resources, ours, kind) == ({"seen": "1,2,3"}, 3)


@pytest.mark.parametrize("kind", ["redis", "elasticsearch"])
async def test_a_field_the_fold_dropped_is_gone_from_the_store(
    resources: Resources, kind: str, items: list[Projected]
) -> None:
    ours, _ = _stores(resources, kind)
    await ours.setup()
    await ours.apply(items[:1])
    assert await _stored(resources, ours, kind) == ({"seen": "1", "first": "yes"}, 1)

    await ours.apply(items[1:2])  # from the cache: only what changed is written

    assert await _stored(resources, ours, kind) == ({"seen": "1,2"}, 2)


async def test_a_rebalance_empties_the_cache(resources: Resources, items: list[Projected]) -> None:
    ours, _ = _stores(resources, "redis")
    await ours.setup()
    await ours.apply(items[:2])
    assert len(ours.cache) == 1

    ours.forget_cached()

    assert len(ours.cache) == 0
