from pathlib import Path

import pytest
from pydantic import ValidationError

from engine.settings import Settings, env_var

pytestmark = pytest.mark.usefixtures("clean_env")


def test_defaults_point_at_the_local_stack() -> None:
    settings = Settings()
    assert settings.postgres.dsn() == "postgresql://engine:engine@127.0.0.1:54329/engine"
    assert settings.redis.url() == "redis://127.0.0.1:63790/0"
    assert settings.kafka.first_host_port() == ("127.0.0.1", 19092)
    assert settings.elasticsearch.host_port() == ("127.0.0.1", 19200)
    assert settings.stack.data_dir == Path(".stack")


def test_environment_overrides_nested_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINE_POSTGRES__PORT", "6543")
    monkeypatch.setenv("ENGINE_KAFKA__BOOTSTRAP_SERVERS", "kafka-a:9092,kafka-b:9092")
    monkeypatch.setenv("ENGINE_ELASTICSEARCH__URL", "http://search:9201")
    settings = Settings()
    assert settings.postgres.port == 6543
    assert settings.kafka.first_host_port() == ("kafka-a", 9092)
    assert settings.elasticsearch.host_port() == ("search", 9201)


def test_invalid_value_is_rejected_naming_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINE_REDIS__PORT", "not-a-port")
    with pytest.raises(ValidationError, match="port"):
        Settings()


def test_password_is_quoted_in_the_dsn_and_hidden_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINE_POSTGRES__PASSWORD", "p@ss/w:rd")
    settings = Settings()
    assert "p%40ss%2Fw%3Ard@" in settings.postgres.dsn()
    assert "p@ss" not in repr(settings)


def test_env_var_names_the_variable_to_set() -> None:
    assert env_var("postgres", "port") == "ENGINE_POSTGRES__PORT"
    assert env_var("stack", "data_dir") == "ENGINE_STACK__DATA_DIR"


def test_search_refresh_policy_is_read_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().elasticsearch.refresh_after_write_s() == 0.1  # the default, after_write
    monkeypatch.setenv("ENGINE_ELASTICSEARCH__REFRESH", "interval")
    monkeypatch.setenv("ENGINE_ELASTICSEARCH__REFRESH_INTERVAL", "250ms")
    search = Settings().elasticsearch
    assert (search.refresh, search.refresh_interval) == ("interval", "250ms")
    assert search.refresh_after_write_s() is None
    monkeypatch.setenv("ENGINE_ELASTICSEARCH__REFRESH", "after_write")
    monkeypatch.setenv("ENGINE_ELASTICSEARCH__REFRESH_MIN_GAP_MS", "40")
    assert Settings().elasticsearch.refresh_after_write_s() == 0.04
    for name, bad in (("REFRESH", "wait_for"), ("REFRESH_MIN_GAP_MS", "-1")):
        monkeypatch.setenv(f"ENGINE_ELASTICSEARCH__{name}", bad)
        with pytest.raises(ValidationError, match=name.lower()):
            Settings()
        monkeypatch.delenv(f"ENGINE_ELASTICSEARCH__{name}")
