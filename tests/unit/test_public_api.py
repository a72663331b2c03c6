import engine


def test_public_names_are_pinned() -> None:
    # Changing the public surface is a decision: update this list on purpose.
    assert sorted(engine.__all__) == [
        "Application",
        "Command",
        "CommandBus",
        "CommandIdReusedError",
        "CommandResult",
        "ConfigurationError",
        "ConflictError",
        "Connection",
        "Document",
        "DocumentProjection",
        "DomainEvent",
        "ENGINE_MIGRATIONS",
        "ElasticsearchDocumentStore",
        "ElasticsearchSettings",
        "EngineError",
        "EventDecodeError",
        "EventEnvelope",
        "EventRegistry",
        "Handler",
        "InvalidInputError",
        "KafkaSettings",
        "Migration",
        "MissingToolError",
        "NotFoundError",
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
        "RebuildableStore",
        "RedisHashStore",
        "RedisSettings",
        "RelaySettings",
        "Resources",
        "RuleViolationError",
        "ServiceUnavailableError",
        "Settings",
        "SqlProjection",
        "StackError",
        "StackSettings",
        "TransientError",
        "UnitOfWork",
        "UnknownEventError",
        "ValidationFailedError",
        "create_pool",
        "ensure_topic",
        "load_application",
        "migrate",
        "open_resources",
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
