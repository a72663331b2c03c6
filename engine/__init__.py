"""Async multi-store CQRS projection engine.

This module is the public API: ``projections/`` and users' own code may import
what ``__all__`` lists and nothing else from ``engine``; everything in
sub-modules not re-exported here is internal and may change.
"""

from engine.application import Application, load_application
from engine.commands import (
    Command,
    CommandBus,
    CommandResult,
    Handler,
    UnitOfWork,
    validate_command,
)
from engine.consistency import ConsistencyGate, ConsistencyToken
from engine.demo import DemoLoader, DemoProgress, DemoSize, DemoSummary
from engine.drivers import elasticsearch_address, elasticsearch_errors
from engine.errors import (
    CommandIdReusedError,
    ConfigurationError,
    ConflictError,
    EngineError,
    EventDecodeError,
    InvalidInputError,
    MissingToolError,
    NotFoundError,
    NotYetConsistentError,
    PoisonError,
    PortInUseError,
    RuleViolationError,
    ServiceUnavailableError,
    StackError,
    TransientError,
    UnknownEventError,
    ValidationFailedError,
    VersionGapError,
    WriteNotAppliedError,
)
from engine.events import DomainEvent, EventEnvelope
from engine.partitioning import partition_for
from engine.postgres.migrations import Migration, migrate
from engine.postgres.pool import Connection, create_pool
from engine.postgres.roles import grant_read_access
from engine.postgres.schema import ENGINE_MIGRATIONS
from engine.projection import (
    Document,
    DocumentProjection,
    Projected,
    Projection,
    ProjectionStore,
    RebuildableStore,
    SqlProjection,
)
from engine.registry import EventRegistry
from engine.relay import OutboxRelay
from engine.resources import Resources, open_resources
from engine.runner import ProjectionRunner
from engine.settings import (
    ApiSettings,
    ElasticsearchSettings,
    KafkaSettings,
    PostgresSettings,
    ReadPostgresSettings,
    RedisSettings,
    RelaySettings,
    RunnerSettings,
    Settings,
    StackSettings,
)
from engine.status import EngineStatus, collect_status
from engine.stores.elasticsearch import ElasticsearchDocumentStore
from engine.stores.postgres import PostgresDocumentStore, PostgresSqlStore
from engine.stores.redis import RedisHashReader, RedisHashStore
from engine.topics import ensure_topic

__all__ = [
    "ENGINE_MIGRATIONS",
    "ApiSettings",
    "Application",
    "Command",
    "CommandBus",
    "CommandIdReusedError",
    "CommandResult",
    "ConfigurationError",
    "ConflictError",
    "Connection",
    "ConsistencyGate",
    "ConsistencyToken",
    "DemoLoader",
    "DemoProgress",
    "DemoSize",
    "DemoSummary",
    "Document",
    "DocumentProjection",
    "DomainEvent",
    "ElasticsearchDocumentStore",
    "ElasticsearchSettings",
    "EngineError",
    "EngineStatus",
    "EventDecodeError",
    "EventEnvelope",
    "EventRegistry",
    "Handler",
    "InvalidInputError",
    "KafkaSettings",
    "Migration",
    "MissingToolError",
    "NotFoundError",
    "NotYetConsistentError",
    "OutboxRelay",
    "PoisonError",
    "PortInUseError",
    "PostgresDocumentStore",
    "PostgresSettings",
    "PostgresSqlStore",
    "Projected",
    "Projection",
    "ProjectionRunner",
    "ProjectionStore",
    "ReadPostgresSettings",
    "RebuildableStore",
    "RedisHashReader",
    "RedisHashStore",
    "RedisSettings",
    "RelaySettings",
    "Resources",
    "RuleViolationError",
    "RunnerSettings",
    "ServiceUnavailableError",
    "Settings",
    "SqlProjection",
    "StackError",
    "StackSettings",
    "TransientError",
    "UnitOfWork",
    "UnknownEventError",
    "ValidationFailedError",
    "VersionGapError",
    "WriteNotAppliedError",
    "collect_status",
    "create_pool",
    "elasticsearch_address",
    "elasticsearch_errors",
    "ensure_topic",
    "grant_read_access",
    "load_application",
    "migrate",
    "open_resources",
    "partition_for",
    "validate_command",
]
