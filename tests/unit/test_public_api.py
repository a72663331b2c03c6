import engine


def test_public_names_are_pinned() -> None:
    # Changing the public surface is a decision: update this list on purpose.
    assert sorted(engine.__all__) == [
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
