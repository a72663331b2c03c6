"""The API's metrics: requests by route template, method and status, and ``GET /metrics``.

A pure ASGI middleware, not Starlette's ``BaseHTTPMiddleware`` (which runs the
app in a task group and wraps every response in a stream: a measurable cost
per request). It times the request, reads the status from the response's
start, and after the app returned takes the route the router matched from the
scope (Starlette stores it there), so the label is the template
(``/orders/{order_id}``), never the raw path: one series per route whatever
ids the clients send. A path no route matches is one label, ``<unmatched>``;
a method outside HTTP's usual ones is ``OTHER``. The work per request is two
clock reads, one dictionary look-up, an increment and an observation.

``GET /metrics`` answers for the whole API: with several workers, every
worker's counts summed (see :mod:`engine.metrics`); and, from the status
sample the answering worker takes for readiness, the status gauges (every
projection's and the outbox's), so the API alone is enough to scrape. It needs no API key, like
``/health``: it carries counts, route templates and projection names, no data.
It is left out of the OpenAPI document, which describes the application's API.
"""

from __future__ import annotations

import time

from fastapi import FastAPI
from prometheus_client import Counter, Histogram
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine import metrics

UNMATCHED = "<unmatched>"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_label(scope: Scope) -> str:
    """The template of the route the router matched in ``scope``, or ``<unmatched>``."""
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return path if isinstance(path, str) and path else UNMATCHED


class RequestMetrics:
    """Counts and times every HTTP request (``engine_http_request*``)."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        # The label children per (route, method, status), looked up once: prometheus-client's
        # labels() validates and locks on every call. Bounded by the label sets (module doc).
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        status = 500  # no response started: the server answers 500 for an app that raised

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await self._app(scope, receive, send_status)
        finally:
            elapsed = time.perf_counter() - started
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            key = (route_label(scope), method, status)
            children = self._children.get(key)
            if children is None:
                children = self._children[key] = (
                    metrics.HTTP_REQUESTS.labels(key[0], method, str(status)),
                    metrics.HTTP_REQUEST_SECONDS.labels(key[0], method),
                )
            children[0].inc()
            children[1].observe(elapsed)


def install_metrics(app: FastAPI) -> None:
    """Count the requests ``app`` answers, and serve ``GET /metrics``.

    Call it after the other middleware is added, so the time measured includes theirs.
    """
    app.add_middleware(RequestMetrics)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics(request: Request) -> Response:
        # The status gauges from this worker's background sample, if it takes one.
        context = getattr(request.app.state, "context", None)
        sampler = getattr(context, "sampler", None)
        extra = [] if sampler is None else [metrics.StatusCollector(sampler)]
        return Response(metrics.render(extra), media_type=metrics.CONTENT_TYPE)
