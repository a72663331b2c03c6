"""An application: the domain a process of the engine serves (its schema, handlers, events).

The CLI finds it by the ``ENGINE_APP`` setting, ``"package.module:NAME"``, so
the engine's own commands (``migrate``, ``relay``, ...) need no change to serve
another domain.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from engine.commands import Command, Handler
from engine.errors import ConfigurationError
from engine.postgres.migrations import Migration
from engine.postgres.outbox import ENGINE_MIGRATIONS
from engine.registry import EventRegistry


@dataclass(frozen=True)
class Application:
    """A domain: its write-model migrations, its command handlers and its event registry."""

    name: str
    migrations: Sequence[Migration]
    handlers: Mapping[type[Command], Handler]
    registry: EventRegistry

    def all_migrations(self) -> list[Migration]:
        """The engine's own tables first, then the domain's."""
        return [*ENGINE_MIGRATIONS, *self.migrations]


def load_application(spec: str) -> Application:
    """Import ``"package.module:NAME"`` and return the Application it names."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        app = getattr(module, attribute or "APP")
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(
            f"cannot load the application {spec!r} (ENGINE_APP): {exc}"
        ) from exc
    if not isinstance(app, Application):
        raise ConfigurationError(f"{spec!r} (ENGINE_APP) is not an engine.Application")
    return app
