"""``engine api``: the HTTP API server (FastAPI on uvicorn), in one process or several.

Serving: uvicorn with its C parts, named explicitly so a missing package fails
at start instead of silently falling back to the pure-Python ones: httptools
parses HTTP/1.1 and uvloop runs the event loop (with h11 and asyncio's loop the
server spent most of its CPU outside our code). Responses with a declared
model are serialized by pydantic in Rust straight to JSON bytes (FastAPI does
that itself for a route's return annotation, so no response class is needed).

Several workers (``--workers N``, ``ENGINE_API__WORKERS``; 0 means one per
core): one Python process serves on one core at most, so N processes share one
listening socket. This process binds it (a taken port fails here, once, exit
4), then supervises N ``engine api --workers 1`` processes that inherit the
socket and accept from it; the kernel hands each connection to one of them.
The supervision is the daemon's (:mod:`engine.supervisor`): a worker that
dies is restarted with a backoff while the others keep serving, exits 2/3/4
stop them all with that code, SIGTERM stops each worker gracefully (requests
in flight get ``ENGINE_API__GRACEFUL_SHUTDOWN_S``). Workers hold no state
between requests beyond connection pools, so any worker may answer any request,
``/metrics`` included: the workers count into files in a directory this
process makes for them, and the one that answers sums them all
(:mod:`engine.metrics`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
from types import FrameType
from typing import Annotated

import typer
import uvicorn

from engine import metrics
from engine.api import create_app
from engine.api.context import open_api_context
from engine.application import Application, load_application
from engine.cli.app import ExitCode, app, err_console, load_settings, run_reporting_errors
from engine.cli.logs import configure
from engine.settings import Settings
from engine.startup import StopSignals
from engine.supervisor import Supervisor, follow_supervisor, worker_command

log = logging.getLogger("engine.api")

# Beyond the graceful shutdown: the lifespan closing the connection pools.
_STOP_MARGIN_S = 5.0


class _Server(uvicorn.Server):
    """uvicorn, but a SIGTERM/SIGINT shutdown exits 0 like every other engine command.

    uvicorn re-raises the signal it caught once it has shut down (so the process
    dies "by" it); an orderly stop on request is a success for scripts here.
    """

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def _worker_count(requested: int) -> int:
    """``requested``, or one per core for 0."""
    return requested if requested > 0 else max(1, os.cpu_count() or 1)


async def _probe(settings: Settings, application: Application) -> None:
    async with open_api_context(settings, application):
        pass


def _config(
    settings: Settings, application: Application, log_level: str, **where: object
) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(settings, application),
        loop="uvloop",
        http="httptools",
        log_level=log_level.lower(),
        log_config=None,  # keep the engine's rich logging
        proxy_headers=False,
        server_header=False,
        # uvicorn takes whole seconds: round up, never to zero.
        timeout_graceful_shutdown=math.ceil(settings.api.graceful_shutdown_s),
        **where,  # type: ignore[arg-type]
    )


def _serve(server: _Server, sockets: list[socket.socket] | None = None) -> None:
    server.run(sockets=sockets)
    if not server.started:
        # uvicorn logged why (a taken port, a failing lifespan: a service down).
        raise typer.Exit(ExitCode.UNAVAILABLE)


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket the workers share (inheritable), or exit 4 naming the address."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        err_console().print(f"[red]error:[/red] cannot listen on {host}:{port}: {exc}")
        raise typer.Exit(ExitCode.UNAVAILABLE) from exc
    sock.set_inheritable(True)
    return sock


async def _supervise(
    settings: Settings, sock: socket.socket, workers: int, log_level: str, signals: StopSignals
) -> int:
    host, port = sock.getsockname()[:2]
    log.info(
        "serving on http://%s:%d with %d workers (supervisor pid %d)",
        host,
        port,
        workers,
        os.getpid(),
    )
    # Whichever worker answers /metrics sums every worker's files (engine.metrics).
    with metrics.workers_directory() as files:
        supervisor = Supervisor(
            worker_command(log_level, os.getpid(), "api", ["--fd", str(sock.fileno())]),
            workers,
            stop_timeout_s=settings.api.graceful_shutdown_s + _STOP_MARGIN_S,
            fatal_codes=(ExitCode.USAGE, ExitCode.CONFIGURATION, ExitCode.UNAVAILABLE),
            pass_fds=(sock.fileno(),),
            env=files.env,
            on_exit=files.exited,
        )
        return await supervisor.run(signals.event())


@app.command()
def api(  # noqa: PLR0917 - one parameter per command-line option
    host: Annotated[
        str | None, typer.Option(help="Address to listen on [default: ENGINE_API__HOST].")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port to listen on [default: ENGINE_API__PORT].")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=0,
            help="Server processes sharing the port, under one supervisor. Default:"
            " ENGINE_API__WORKERS (1); 0 means one per core.",
            show_default=False,
        ),
    ] = None,
    log_level: Annotated[
        str, typer.Option("--log-level", help="debug, info, warning or error.")
    ] = "info",
    supervisor_pid: Annotated[int | None, typer.Option("--supervisor-pid", hidden=True)] = None,
    fd: Annotated[int | None, typer.Option("--fd", hidden=True)] = None,
) -> None:
    """Serve the HTTP API: commands, queries, and OpenAPI docs at /docs.

    Commands need ENGINE_API__WRITER_KEY and queries ENGINE_API__READER_KEY in the
    X-API-Key header when those are set. Stops cleanly on SIGTERM/SIGINT: requests
    in flight get ENGINE_API__GRACEFUL_SHUTDOWN_S to finish.

    With more than one worker, this process binds the port and supervises the
    workers (each an `engine api --workers 1` on the shared socket): it restarts
    one that dies, forwards SIGTERM/SIGINT to them all and exits 0 once they all
    stopped cleanly.
    """
    configure(log_level)
    settings = load_settings()
    count = _worker_count(settings.api.workers if workers is None else workers)
    application = run_reporting_errors(lambda: load_application(settings.app))
    if fd is None:
        # Open the connections once before serving (or starting workers), so a service
        # that is down or a missing read role fails here with its message and exit code.
        run_reporting_errors(lambda: asyncio.run(_probe(settings, application)))
    if count > 1 and fd is None:
        signals = StopSignals()
        sock = _listen(host or settings.api.host, port or settings.api.port)
        raise typer.Exit(asyncio.run(_supervise(settings, sock, count, log_level, signals)))
    if supervisor_pid is not None:  # a worker: stop (cleanly) when the supervisor dies
        follow_supervisor(supervisor_pid)
    if fd is not None:
        _serve(_Server(_config(settings, application, log_level)), [socket.socket(fileno=fd)])
        return
    where = {"host": host or settings.api.host, "port": port or settings.api.port}
    _serve(_Server(_config(settings, application, log_level, **where)))
