"""The native stack manager against the running local stack."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from engine.errors import ConfigurationError, PortInUseError
from engine.settings import RedisSettings, Settings, StackSettings
from engine.stack import StackManager
from engine.stack.process import running

ENGINE = [sys.executable, "-m", "engine"]


def _engine(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ENGINE, *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_status_reports_every_service_healthy(stack: Settings) -> None:
    result = _engine("stack", "status")
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("postgres", "redis", "kafka", "elasticsearch"):
        assert name in result.stdout


def test_up_twice_is_harmless(stack: Settings) -> None:
    manager = StackManager(stack, lambda _line: None)
    before = [s.pid for s in manager.status()]
    result = _engine("stack", "up")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [s.pid for s in manager.status()] == before
    assert all(s.healthy for s in manager.status())


def test_a_taken_port_names_the_port_and_the_setting(stack: Settings, tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        settings = stack.model_copy(
            update={"redis": RedisSettings(port=port), "stack": StackSettings(data_dir=tmp_path)}
        )
        with pytest.raises(PortInUseError) as caught:
            StackManager(settings, lambda _line: None).up(["redis"])
    message = str(caught.value)
    assert f"port {port}" in message
    assert "ENGINE_REDIS__PORT" in message


def test_unknown_service_names_are_refused(stack: Settings) -> None:
    with pytest.raises(ConfigurationError, match="unknown service"):
        StackManager(stack, lambda _line: None).up(["mysql"])


def test_redis_restarts_with_its_data(stack: Settings) -> None:
    lines: list[str] = []
    manager = StackManager(stack, lines.append)
    client = redis.Redis(host=stack.redis.host, port=stack.redis.port)
    client.hset("engine:test:restart", mapping={"status": "SHIPPED"})
    client.close()
    manager.down(["redis"])
    assert running(manager.layout.pid_file("redis")) is None
    assert "redis stopped" in lines
    manager.up(["redis"])
    client = redis.Redis(host=stack.redis.host, port=stack.redis.port)
    try:
        assert client.hgetall("engine:test:restart") == {b"status": b"SHIPPED"}
        client.delete("engine:test:restart")
    finally:
        client.close()
