import base64
import socket
from pathlib import Path

from engine.settings import KafkaSettings, Settings, StackSettings
from engine.stack.layout import StackLayout
from engine.stack.services.kafka import KafkaService, api_versions_ok, new_cluster_id


def test_cluster_id_is_16_bytes_of_urlsafe_base64() -> None:
    for _ in range(200):
        cluster_id = new_cluster_id()
        assert len(cluster_id) == 22
        assert not cluster_id.startswith("-")
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_server_properties_follow_the_settings(tmp_path: Path) -> None:
    settings = Settings(
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:29092", partitions=4),
        stack=StackSettings(data_dir=tmp_path, kafka_controller_port=29093),
    )
    service = KafkaService(settings, StackLayout(tmp_path))
    service._dir.mkdir(parents=True)
    props = dict(line.split("=", 1) for line in service._server_properties().splitlines())
    assert props["process.roles"] == "broker,controller"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:29092,CONTROLLER://127.0.0.1:29093"
    assert props["num.partitions"] == "4"
    assert props["auto.create.topics.enable"] == "false"
    assert service.port == 29092


def test_api_versions_probe_is_false_for_a_non_kafka_listener() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert api_versions_ok("127.0.0.1", port) is False
