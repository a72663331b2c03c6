"""The ``engine`` command: settings are built here, once, and handed down."""

from __future__ import annotations

import enum
import sys
from collections.abc import Callable
from typing import TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

from engine.errors import ConfigurationError, EngineError, TransientError
from engine.settings import Settings

T = TypeVar("T")


class ExitCode(enum.IntEnum):
    """Exit codes scripts can rely on."""

    OK = 0
    FAILED = 1  # the command ran and found a problem (e.g. a service is down in `status`)
    USAGE = 2  # bad arguments (typer's own)
    CONFIGURATION = 3  # fix a setting or install something; the message says what
    UNAVAILABLE = 4  # a service could not be reached; retrying later may work


app = typer.Typer(
    name="engine",
    help="Async multi-store CQRS projection engine: commands to Postgres, events through "
    "Kafka, projections into Postgres, Redis and Elasticsearch.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def err_console() -> Console:
    return Console(stderr=True)


def load_settings() -> Settings:
    """Settings from the environment (ENGINE_*); a bad value stops with the variable named."""
    try:
        return Settings()
    except ValidationError as exc:
        err_console().print(
            f"[red]error:[/red] invalid configuration from ENGINE_* variables:\n{exc}"
        )
        raise typer.Exit(ExitCode.CONFIGURATION) from exc


def run_reporting_errors(action: Callable[[], T]) -> T:
    """Run ``action``; turn engine errors into a readable message and a stable exit code."""
    try:
        return action()
    except ConfigurationError as exc:
        err_console().print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(ExitCode.CONFIGURATION) from exc
    except TransientError as exc:
        err_console().print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(ExitCode.UNAVAILABLE) from exc
    except EngineError as exc:
        err_console().print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(ExitCode.FAILED) from exc


def with_commands() -> typer.Typer:
    """The app with every sub-command registered (each module registers its own on import)."""
    from engine.cli import (  # noqa: F401 - registers the sub-commands
        api,
        demo,
        dlq,
        rebuild,
        run,
        smoke,
        stack,
        status,
        up,
        write,
    )

    return app


def main() -> None:
    """Console-script entry point."""
    sys.exit(with_commands()())
