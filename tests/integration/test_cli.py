"""The real `engine` command, run as a user would."""

import os
import subprocess
import sys

from engine.settings import Settings


def _engine(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_smoke_command_round_trips_every_service(stack: Settings) -> None:
    result = _engine("smoke")
    assert result.returncode == 0, result.stderr
    for name in ("postgres", "redis", "kafka", "elasticsearch"):
        assert name in result.stdout


def test_smoke_against_a_down_service_exits_4_and_says_how_to_start_it(stack: Settings) -> None:
    result = _engine("smoke", "redis", env={"ENGINE_REDIS__PORT": "1"})
    assert result.returncode == 4
    assert "Redis is not reachable at 127.0.0.1:1" in result.stderr
    assert "./dev up" in result.stderr


def test_bad_configuration_exits_3_naming_the_field(stack: Settings) -> None:
    result = _engine("smoke", env={"ENGINE_POSTGRES__PORT": "many"})
    assert result.returncode == 3
    assert "port" in result.stderr


def test_help_lists_the_commands() -> None:
    result = _engine("--help")
    assert result.returncode == 0
    assert "stack" in result.stdout and "smoke" in result.stdout
