"""docker-compose.yml cannot run here (no Docker engine); hold it to the settings instead."""

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from engine.settings import Settings, env_var
from engine.stack.versions import ELASTICSEARCH_VERSION, KAFKA_VERSION

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("postgres", "redis", "kafka", "elasticsearch")

pytestmark = pytest.mark.usefixtures("clean_env")


def _compose() -> dict[str, Any]:
    loaded = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def _host_ports(service: dict[str, Any]) -> set[int]:
    # "127.0.0.1:54329:5432" -> 54329
    return {int(spec.split(":")[-2]) for spec in service.get("ports", [])}


def _env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines())
    return {k: v for k, v in (p for p in pairs if len(p) == 2) if not k.startswith("#")}


def test_every_service_is_published_on_the_port_the_settings_expect() -> None:
    services = _compose()["services"]
    defaults = Settings()
    expected = {
        "postgres": defaults.postgres.port,
        "redis": defaults.redis.port,
        "kafka": defaults.kafka.first_host_port()[1],
        "elasticsearch": defaults.elasticsearch.host_port()[1],
    }
    for name in SERVICES:
        assert name in services, f"docker-compose.yml lacks the {name} service"
        assert expected[name] in _host_ports(services[name]), name


def test_kafka_runs_kraft_and_advertises_the_host_listener() -> None:
    kafka = _compose()["services"]["kafka"]
    env = kafka["environment"]
    assert kafka["image"] == f"apache/kafka:{KAFKA_VERSION}"
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "EXTERNAL://127.0.0.1:19092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_elasticsearch_is_single_node_without_security_at_the_pinned_version() -> None:
    es = _compose()["services"]["elasticsearch"]
    assert es["image"] == f"elasticsearch:{ELASTICSEARCH_VERSION}"
    assert es["environment"]["discovery.type"] == "single-node"
    assert es["environment"]["xpack.security.enabled"] == "false"


def test_postgres_credentials_match_the_settings() -> None:
    env = _compose()["services"]["postgres"]["environment"]
    pg = Settings().postgres
    assert env["POSTGRES_USER"] == pg.user
    assert env["POSTGRES_PASSWORD"] == pg.password.get_secret_value()
    assert env["POSTGRES_DB"] == pg.database


def test_engine_containers_reach_services_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = _compose()
    engine_services = [s for s in compose["services"].values() if "build" in s]
    assert engine_services, "docker-compose.yml runs none of the engine's own processes"
    for service in engine_services:
        assert set(service["depends_on"]) == set(SERVICES)
        assert service["env_file"] == ["config/docker.env"]
    for key, value in _env_file(ROOT / "config" / "docker.env").items():
        monkeypatch.setenv(key, value)
    inside = Settings()
    assert inside.postgres.host == "postgres"
    assert inside.redis.host == "redis"
    assert inside.kafka.first_host_port() == ("kafka", 9092)
    assert inside.elasticsearch.host_port() == ("elasticsearch", 9200)


def test_the_engine_container_runs_the_whole_engine_and_publishes_the_api() -> None:
    engine = _compose()["services"]["engine"]
    assert engine["command"][:2] == ["up", "--demo"]
    assert Settings().api.port in _host_ports(engine)
    assert _env_file(ROOT / "config" / "docker.env")["ENGINE_API__HOST"] == "0.0.0.0"


def test_the_env_example_documents_every_setting_with_its_default() -> None:
    documented = _env_file(ROOT / "config" / "engine.env.example")
    example = (ROOT / "config" / "engine.env.example").read_text()
    for section, model in Settings():
        if not isinstance(model, BaseModel):
            assert documented[f"ENGINE_{section.upper()}"] == str(model)
            continue
        for field, value in model:
            name = env_var(section, field)
            if value is None:  # unset by default: documented as a commented-out line
                assert f"# {name}=" in example, f"{name} missing from config/engine.env.example"
                continue
            assert name in documented, f"{name} missing from config/engine.env.example"
            shown = value.get_secret_value() if hasattr(value, "get_secret_value") else value
            assert documented[name] == str(shown), name
