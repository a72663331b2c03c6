"""Which store each orders projection writes to, and under what name."""

from __future__ import annotations

from collections.abc import Sequence

from engine import (
    ElasticsearchDocumentStore,
    PostgresDocumentStore,
    PostgresSqlStore,
    Projection,
    ProjectionStore,
    RedisHashStore,
    Resources,
)
from projections.orders.views import (
    CustomerOrders,
    OrderDetails,
    OrderQuickLookup,
    OrderSearch,
    OrderStats,
)


def quick_lookup_prefix(resources: Resources) -> str:
    return f"{resources.settings.redis.key_prefix}orders:quick:"


def search_alias(resources: Resources) -> str:
    return f"{resources.settings.elasticsearch.index_prefix}-orders"


def build_projections(resources: Resources) -> Sequence[tuple[Projection, ProjectionStore]]:
    details, listing, quick, search, stats = (
        OrderDetails(),
        CustomerOrders(),
        OrderQuickLookup(),
        OrderSearch(),
        OrderStats(),
    )
    cached = resources.settings.runner.document_cache_size
    return [
        (
            details,
            PostgresDocumentStore(resources.pool, details, "order_details", OrderDetails.SCHEMA),
        ),
        (
            listing,
            PostgresDocumentStore(
                resources.pool, listing, "customer_orders", CustomerOrders.SCHEMA
            ),
        ),
        (stats, PostgresSqlStore(resources.pool, stats)),
        (
            quick,
            RedisHashStore(
                resources.redis,
                quick,
                quick_lookup_prefix(resources),
                cache_documents=cached,
            ),
        ),
        (
            search,
            ElasticsearchDocumentStore(
                resources.elasticsearch,
                search,
                search_alias(resources),
                OrderSearch.MAPPINGS,
                settings={
                    "number_of_shards": 1,
                    "number_of_replicas": 0,
                    "refresh_interval": resources.settings.elasticsearch.refresh_interval,
                },
                refresh_after_write_s=resources.settings.elasticsearch.refresh_after_write_s(),
                cache_documents=cached,
            ),
        ),
    ]
