"""Shared fixtures.

Fixtures start nothing: the local stack is started by ``./dev test`` (or
``./dev up``). When a service is missing, the test fails at once with the
service, its address and the command that starts it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.settings import ENV_PREFIX, Settings
from tests.services import unreachable_services

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in item.nodeid:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def settings() -> Settings:
    """The settings the local stack was started with (ENGINE_* variables, else defaults)."""
    return Settings()


@pytest.fixture(scope="session")
def stack(settings: Settings) -> Settings:
    """Every service of the local stack, reachable; fails clearly if one is not."""
    missing = unreachable_services(settings)
    if missing:
        pytest.fail("\n".join(missing), pytrace=False)
    return settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No ENGINE_* variable from the caller's shell leaks into a unit test."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    yield
