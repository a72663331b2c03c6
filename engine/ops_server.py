"""The daemon's and the relay's ops port: ``/metrics``, ``/health/live`` and ``/health/ready``.

``engine run`` and ``engine relay`` serve no HTTP API, yet Prometheus must
scrape them and an orchestrator probe them. This is the smallest server that
does it: ``asyncio.start_server`` in the process's own event loop (uvloop for
the daemon), three GET routes, ``Connection: close``. Not uvicorn: it would
take over the process's SIGTERM/SIGINT handling, which belongs to the daemon's
clean shutdown. Serving in the loop that does the work is deliberate: a loop
that is blocked answers no probe, which is exactly what liveness must see.

Bounds, so a slow or hostile client costs little: a request head larger than
``MAX_HEAD_BYTES`` gets 431, one that does not arrive within
``REQUEST_TIMEOUT_S`` is dropped, a response that cannot be written within it
is abandoned, and at most ``MAX_CONNECTIONS`` are served at once (the others
wait their turn, then get the same bounds).

- ``/health/live``: 200 while the process's loop runs and the work it serves
  for (the runner, the supervisor, the relay loop: :meth:`ProcessOps.follow`)
  has not ended.
- ``/health/ready``: :func:`engine.health.readiness` of the last status sample,
  for what this process is responsible for (the daemon: stalled projections;
  the relay: a stalled relay); 503 ``starting`` until the process has its
  connections and starts sampling. JSON either way.
- ``/metrics``: this process's counts (or every worker's, for a supervisor;
  :mod:`engine.metrics`) and the status gauges from the last sample.

The status is sampled (:class:`engine.health.StatusSampler`) only when the
port is set: a process nobody watches pays for no collect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from http import HTTPStatus
from typing import Any, Literal

from engine import metrics
from engine.application import load_application
from engine.errors import TransientError
from engine.health import Problem, Readiness, StatusSampler, readiness
from engine.resources import Resources, open_resources
from engine.settings import Settings
from engine.status import EngineStatus, collect_status

log = logging.getLogger("engine.ops")

MAX_HEAD_BYTES = 8 * 1024
REQUEST_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 16
_ROUTES = ("/metrics", "/health/live", "/health/ready")

Component = Literal["daemon", "relay"]
Answer = tuple[int, str, bytes]


class OpsServer:
    """A tiny HTTP/1.1 server for the three ops routes; ``answer`` makes each response."""

    def __init__(self, host: str, port: int, answer: Callable[[str], Answer]) -> None:
        self.host = host
        self.port = port
        self._answer = answer
        self._server: asyncio.Server | None = None
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Listen; a taken port raises :class:`TransientError` naming the address."""
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, limit=MAX_HEAD_BYTES, reuse_address=True
            )
        except OSError as exc:
            raise TransientError(
                f"cannot listen on {self.host}:{self.port} for /metrics and /health: {exc}"
            ) from exc
        if self.port == 0:  # an ephemeral port (tests): say which
            self.port = self._server.sockets[0].getsockname()[1]
        log.info("serving /metrics, /health/live and /health/ready on %s", self.url)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), REQUEST_TIMEOUT_S)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self._slots:
            try:
                await self._exchange(reader, writer)
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                pass  # the client went away or was too slow: nothing to answer
            except Exception:
                log.exception("the ops server failed to answer a request")
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), REQUEST_TIMEOUT_S)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                status, ctype, body = _text(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
                head = b""
            else:
                status, ctype, body = self._route(head)
            send_body = not head.startswith(b"HEAD ")
            writer.write(
                (
                    f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
                    f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
                ).encode("latin-1")
                + (body if send_body else b"")
            )
            await writer.drain()

    def _route(self, head: bytes) -> Answer:
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _text(HTTPStatus.BAD_REQUEST)
        method, target = parts[0], parts[1].split("?", 1)[0]
        if target not in _ROUTES:
            return _text(HTTPStatus.NOT_FOUND)
        if method not in ("GET", "HEAD"):
            return _text(HTTPStatus.METHOD_NOT_ALLOWED)
        return self._answer(target)


def _text(status: HTTPStatus) -> Answer:
    return status.value, "text/plain; charset=utf-8", f"{status.phrase}\n".encode()


def _json(status: int, body: object) -> Answer:
    return status, "application/json", json.dumps(body).encode()


class ProcessOps:
    """One process's ops endpoints: the server, the status sampler and what is judged.

    ``component`` says what readiness judges and which status gauges are shown:
    the daemon its projections, the relay the relay and the outbox.
    ``multiprocess_dir``: the workers' metric files a supervisor answers for.
    """

    def __init__(
        self,
        settings: Settings,
        port: int,
        component: Component,
        *,
        multiprocess_dir: str | None = metrics.MULTIPROCESS_DIR,
    ) -> None:
        self._settings = settings
        self._component = component
        self._multiprocess_dir = multiprocess_dir
        self.server = OpsServer(settings.ops.host, port, self._answer)
        self.sampler: StatusSampler | None = None
        self._followed: asyncio.Future[Any] | None = None
        self._collector: metrics.StatusCollector | None = None
        # What this process answers for: the daemon its projections, the relay the outbox.
        self._projections = component == "daemon"
        self._outbox = component == "relay"

    async def __aenter__(self) -> ProcessOps:
        await self.server.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.server.close()

    def follow(self, work: asyncio.Future[Any]) -> None:
        """Live only while ``work`` (the runner, the supervisor, the relay loop) runs."""
        self._followed = work

    @asynccontextmanager
    async def sampling(self, collect: Callable[[], Awaitable[EngineStatus]]) -> AsyncIterator[None]:
        """Sample the status in the background inside the block (the process is started)."""
        ops = self._settings.ops
        sampler = StatusSampler(
            collect, interval_s=ops.status_interval_s, timeout_s=ops.status_timeout_s
        )
        self.sampler = sampler
        self._collector = metrics.StatusCollector(
            sampler, projections=self._projections, outbox=self._outbox
        )
        async with sampler.running():
            yield

    async def sample_on(self, stack: AsyncExitStack, resources: Resources | None = None) -> None:
        """Sample the status until ``stack`` closes, with ``resources`` (the daemon's own), else
        with connections of its own (:func:`status_resources`: a supervisor's, the relay's)."""
        settings = self._settings
        application = load_application(settings.app)
        if resources is None:
            resources = await stack.enter_async_context(status_resources(settings))
        reads = resources
        await stack.enter_async_context(
            self.sampling(lambda: collect_status(settings, application, reads))
        )

    def readiness(self) -> Readiness:
        if self.sampler is None:
            return Readiness(False, (Problem(self._component, "starting"),), None)
        verdict = readiness(
            self.sampler.latest,
            interval_s=self._settings.ops.status_interval_s,
            projections=self._projections,
            relay=self._outbox,
        )
        if self._followed is not None and self._followed.done():
            stopped = Problem(self._component, "stopped")
            return replace(verdict, ready=False, problems=(*verdict.problems, stopped))
        return verdict

    def _live(self) -> bool:
        return self._followed is None or not self._followed.done()

    def _answer(self, route: str) -> Answer:
        if route == "/health/live":
            if self._live():
                return _json(200, {"status": "live"})
            return _json(503, {"status": "not live", "reason": f"the {self._component} stopped"})
        if route == "/health/ready":
            verdict = self.readiness()
            return _json(200 if verdict.ready else 503, verdict.body())
        extra = [self._collector] if self._collector is not None else []
        return (
            200,
            metrics.CONTENT_TYPE,
            metrics.render(extra, multiprocess_dir=self._multiprocess_dir),
        )


@asynccontextmanager
async def status_resources(settings: Settings) -> AsyncIterator[Resources]:
    """Connections for the status collect alone (a supervisor's, the relay's): at most two.

    No connection opens before the first collect, so this never waits for Postgres.
    """
    small = settings.postgres.model_copy(update={"pool_min_size": 0, "pool_max_size": 2})
    async with open_resources(settings, small) as resources:
        yield resources


@asynccontextmanager
async def serving(
    settings: Settings,
    port: int | None,
    component: Component,
    *,
    multiprocess_dir: str | None = metrics.MULTIPROCESS_DIR,
) -> AsyncIterator[ProcessOps | None]:
    """The ops endpoints on ``port`` inside the block; None when the port is unset or 0."""
    if not port:
        yield None
        return
    async with ProcessOps(settings, port, component, multiprocess_dir=multiprocess_dir) as ops:
        yield ops
