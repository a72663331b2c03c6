import engine


def test_public_names_are_pinned() -> None:
    # Changing the public surface is a decision: update this list on purpose.
    assert sorted(engine.__all__) == [
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
        "ENGINE_MIGRATIONS",
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
    for name in engine.__all__:
        assert getattr(engine, name) is not None


def test_error_tree_groups_by_reaction() -> None:
    assert issubclass(engine.ServiceUnavailableError, engine.TransientError)
    assert issubclass(engine.PortInUseError, engine.ConfigurationError)
    assert issubclass(engine.MissingToolError, engine.ConfigurationError)
    assert issubclass(engine.StackError, engine.ConfigurationError)
    for branch in (
        engine.TransientError,
        engine.InvalidInputError,
        engine.PoisonError,
        engine.ConfigurationError,
    ):
        assert issubclass(branch, engine.EngineError)
