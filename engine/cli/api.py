"""``engine api``: the HTTP API server (FastAPI on uvicorn)."""

from __future__ import annotations

import asyncio
from types import FrameType
from typing import Annotated

import typer
import uvicorn

from engine.api import create_app
from engine.api.context import open_api_context
from engine.application import Application, load_application
from engine.cli.app import app, load_settings, run_reporting_errors
from engine.cli.logs import configure
from engine.settings import Settings


class _Server(uvicorn.Server):
    """uvicorn, but a SIGTERM/SIGINT shutdown exits 0 like every other engine command.

    uvicorn re-raises the signal it caught once it has shut down (so the process
    dies "by" it); an orderly stop on request is a success for scripts here.
    """

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


async def _probe(settings: Settings, application: Application) -> None:
    async with open_api_context(settings, application):
        pass


@app.command()
def api(
    host: Annotated[
        str | None, typer.Option(help="Address to listen on [default: ENGINE_API__HOST].")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port to listen on [default: ENGINE_API__PORT].")
    ] = None,
    log_level: Annotated[
        str, typer.Option("--log-level", help="debug, info, warning or error.")
    ] = "info",
) -> None:
    """Serve the HTTP API: commands, queries, and OpenAPI docs at /docs.

    Commands need ENGINE_API__WRITER_KEY and queries ENGINE_API__READER_KEY in the
    X-API-Key header when those are set. Stops cleanly on SIGTERM/SIGINT.
    """
    configure(log_level)
    settings = load_settings()
    application = run_reporting_errors(lambda: load_application(settings.app))
    # Open the connections once before serving, so a service that is down or a
    # missing read role fails here with its message and exit code.
    run_reporting_errors(lambda: asyncio.run(_probe(settings, application)))
    server = _Server(
        uvicorn.Config(
            create_app(settings, application),
            host=host or settings.api.host,
            port=port or settings.api.port,
            log_level=log_level.lower(),
            log_config=None,  # keep the engine's rich logging
            proxy_headers=False,
            server_header=False,
        )
    )
    server.run()
    if not server.started:
        # uvicorn logged why (a taken port, a failing lifespan: a service down).
        raise typer.Exit(4)
