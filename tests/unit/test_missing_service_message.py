import socket

from engine.settings import (
    ElasticsearchSettings,
    KafkaSettings,
    PostgresSettings,
    RedisSettings,
    Settings,
)
from tests.services import unreachable_services


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_each_missing_service_is_named_with_the_command_that_starts_it() -> None:
    port = _closed_port()
    settings = Settings(
        postgres=PostgresSettings(port=port),
        redis=RedisSettings(port=port),
        kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}"),
        elasticsearch=ElasticsearchSettings(url=f"http://127.0.0.1:{port}"),
    )
    messages = unreachable_services(settings)
    assert [m.split(" ")[0] for m in messages] == ["PostgreSQL", "Redis", "Kafka", "Elasticsearch"]
    assert all(f"127.0.0.1:{port}" in m and "./dev up" in m for m in messages)
    assert "ENGINE_POSTGRES__PORT" in messages[0]
