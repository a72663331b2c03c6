"""An application: the domain a process of the engine serves (its schema, handlers, events).

The CLI finds it by the ``ENGINE_APP`` setting, ``"package.module:NAME"``, so
the engine's own commands (``migrate``, ``relay``, ...) need no change to serve
another domain.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.commands import Command, Handler
from engine.demo import DemoLoader
from engine.errors import ConfigurationError
from engine.postgres.migrations import Migration
from engine.postgres.schema import ENGINE_MIGRATIONS
from engine.projection import Projection, ProjectionStore
from engine.registry import EventRegistry
from engine.resources import Resources

if TYPE_CHECKING:
    from fastapi import APIRouter

# Builds the projections of an application, each paired with its store.
ProjectionFactory = Callable[[Resources], Sequence[tuple[Projection, ProjectionStore]]]


# Builds the application's FastAPI router (its command and query endpoints).
ApiFactory = Callable[[], "APIRouter"]


def _no_projections(_resources: Resources) -> Sequence[tuple[Projection, ProjectionStore]]:
    return ()


@dataclass(frozen=True)
class Application:
    """A domain: its write-model migrations, command handlers, events and projections."""

    name: str
    migrations: Sequence[Migration]
    handlers: Mapping[type[Command], Handler]
    registry: EventRegistry
    projections: ProjectionFactory = field(default=_no_projections)
    demo: DemoLoader | None = None  # loads a sample for `engine demo`
    api: ApiFactory | None = None  # the HTTP endpoints for `engine api`

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
