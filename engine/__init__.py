"""Async multi-store CQRS projection engine.

This module is the public API: ``projections/`` and users' own code may import
what ``__all__`` lists and nothing else from ``engine``; everything in
sub-modules not re-exported here is internal and may change.
"""

from engine.errors import (
    ConfigurationError,
    EngineError,
    InvalidInputError,
    MissingToolError,
    PoisonError,
    PortInUseError,
    ServiceUnavailableError,
    StackError,
    TransientError,
)
from engine.settings import (
    ElasticsearchSettings,
    KafkaSettings,
    PostgresSettings,
    RedisSettings,
    Settings,
    StackSettings,
)

__all__ = [
    "ConfigurationError",
    "ElasticsearchSettings",
    "EngineError",
    "InvalidInputError",
    "KafkaSettings",
    "MissingToolError",
    "PoisonError",
    "PortInUseError",
    "PostgresSettings",
    "RedisSettings",
    "ServiceUnavailableError",
    "Settings",
    "StackError",
    "StackSettings",
    "TransientError",
]
